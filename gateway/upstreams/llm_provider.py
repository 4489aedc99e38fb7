"""A model provider (Anthropic, OpenAI or anything speaking their APIs), reached with Bastion's key.

The caller's headers are not forwarded: only the few that select API behaviour (versions, betas)
pass, so the caller's credential, cookies or tracing state never reach the provider; Bastion adds
its own credential. The answer is handed back unread (`Reply`), so a stream can be relayed event
by event; nothing read from it grows past `max_response_bytes` (a JSON body whole, a stream per
event).
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from gateway.config import LLMProvider
from gateway.errors import ProtocolError, UpstreamError, UpstreamTimeout
from gateway.upstreams.credentials import static_credential
from gateway.upstreams.streamable_http import Reply
from gateway.upstreams.transport import LeanTransport, header_value_ok

PASSED_HEADERS = frozenset({"anthropic-version", "anthropic-beta", "openai-beta"})
"""Caller headers the provider sees: they choose the API version and features, and carry no secret."""


class Provider:
    """One configured provider: its base URL, Bastion's credential for it, a pooled client."""

    def __init__(self, name: str, cfg: LLMProvider) -> None:
        self.name = name
        self.cfg = cfg
        self.kind = cfg.kind
        self._base = cfg.url.rstrip("/")
        self._credential = _credential(name, cfg)
        # idle connections are dropped before the usual 5 s server keep-alive ends: a request sent
        # on a connection the server is closing fails, and a model call is never sent twice
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=32, keepalive_expiry=4.0)
        self._timeouts = httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)
        self.client = httpx.AsyncClient(
            timeout=self._timeouts, limits=limits, transport=LeanTransport(limits), follow_redirects=False
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(self, path: str, body: bytes, headers: Mapping[str, str], stream: bool) -> Reply:
        """POST `body` to `<url><path>`; the reply is unread. Transport failures raise UpstreamError."""
        sent = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        for name in PASSED_HEADERS:
            value = headers.get(name)
            if value is not None and header_value_ok(value) and len(value) <= 512:
                sent[name] = value
        if self._credential is not None:
            sent[self._credential[0]] = self._credential[1]
        request = self.client.build_request("POST", self._base + path, content=body, headers=sent)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"provider {self.name} timed out") from exc
        except httpx.LocalProtocolError as exc:
            raise ProtocolError(f"the request cannot be sent to the provider: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"provider {self.name} unreachable: {type(exc).__name__}") from exc
        return Reply(response, self.cfg.max_response_bytes, long_lived=stream)


def _credential(name: str, cfg: LLMProvider) -> tuple[str, str] | None:
    return static_credential(f"llm.providers.{name}.credential", cfg.credential)
