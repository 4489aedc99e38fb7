"""An HTTPS webhook or a Splunk HTTP Event Collector: one POST per batch, confirmed by its 2xx."""

from __future__ import annotations

import json
import logging
import os
from urllib.parse import urlsplit

import httpx

from gateway.config import HttpSinkConfig
from gateway.errors import ConfigError, SinkError
from gateway.sinks.events import Event

log = logging.getLogger(__name__)

_TYPES = {"cef": "text/plain; charset=utf-8", "splunk-hec": "application/json"}


class HttpTarget:
    def __init__(self, cfg: HttpSinkConfig) -> None:
        self.cfg = cfg
        headers = {"content-type": _TYPES.get(cfg.format, "application/x-ndjson")}
        if cfg.token_env is not None:
            token = os.environ.get(cfg.token_env)
            if not token:
                raise ConfigError(f"audit.sinks.{cfg.name}.token_env: {cfg.token_env} is not set")
            scheme = "Splunk" if cfg.format == "splunk-hec" else "Bearer"
            headers["authorization"] = f"{scheme} {token}"
        parts = urlsplit(cfg.url)
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "audit sink %s: %s is plain HTTP: the trail crosses the network unencrypted",
                cfg.name,
                cfg.url,
            )
        verify: str | bool = str(cfg.ca_file) if cfg.ca_file else True
        self._client = httpx.AsyncClient(
            headers=headers, timeout=cfg.timeout_s, verify=verify, follow_redirects=False, trust_env=False
        )

    def describe(self) -> str:
        return self.cfg.url

    async def send(self, events: list[Event]) -> None:
        first, last = events[0], events[-1]
        body = "\n".join(e.line for e in events).encode() + b"\n"
        # A receiver that keeps what it got can drop a batch it has already seen by this header.
        batch = f"{first.instance} {first.seq}-{last.seq}"
        try:
            r = await self._client.post(self.cfg.url, content=body, headers={"x-bastion-batch": batch})
        except httpx.HTTPError as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}"[:300]) from exc
        if not 200 <= r.status_code < 300:
            raise SinkError(f"HTTP {r.status_code}: {r.text[:200]!r}")
        if self.cfg.format == "splunk-hec":
            # HEC answers 200 {"text": "Success", "code": 0}; any other code is a refusal.
            try:
                code = json.loads(r.content).get("code", 0)
            except (ValueError, AttributeError):
                code = 0
            if code != 0:
                raise SinkError(f"HEC code {code}: {r.text[:200]!r}")

    async def aclose(self) -> None:
        await self._client.aclose()
