"""An A2A agent, reached with Bastion's credential (never the caller's).

Only what selects protocol behaviour passes from the caller (`A2A-Version`); Bastion adds its own
credential for the agent (the front adds the delegation token the agent may present back). The
answer is handed back unread (`Reply`), so a stream can be relayed event by event; nothing read
from it grows past `max_response_bytes` (a JSON body whole, a stream per event).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import httpx

from gateway.config import AgentConfig, UpstreamConfig
from gateway.errors import ProtocolError, UpstreamError, UpstreamTimeout
from gateway.upstreams.credentials import static_credential
from gateway.upstreams.resilience import FaultGuard
from gateway.upstreams.streamable_http import Reply
from gateway.upstreams.transport import LeanTransport

CARD_PATH = ".well-known/agent-card.json"
MAX_CARD_BYTES = 256 * 1024
VERSION_HEADER = "a2a-version"
_VERSION = re.compile(r"\d{1,3}\.\d{1,3}")


class AgentClient:
    """One configured agent: its endpoint, Bastion's credential for it, a pooled client, and the
    fault guard (deadline, breaker) every message to it goes through."""

    def __init__(self, name: str, cfg: AgentConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.url = cfg.url
        self._credential = static_credential(f"agents.{name}.credential", cfg.credential)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=32, keepalive_expiry=4.0)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            limits=limits,
            transport=LeanTransport(limits),
            follow_redirects=False,
        )
        self.guard = FaultGuard(
            f"a2a:{name}", UpstreamConfig(url=cfg.url, timeout_s=cfg.timeout_s, breaker=cfg.breaker)
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def headers(self, version: str | None, stream: bool) -> dict[str, str]:
        """What the agent is sent: Bastion's credential and the protocol version (the front adds
        the delegation token)."""
        sent = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
        }
        if version is not None:
            if not _VERSION.fullmatch(version):
                raise ProtocolError("the A2A-Version header must read like 1.0")
            sent[VERSION_HEADER] = version
        if self._credential is not None:
            sent[self._credential[0]] = self._credential[1]
        return sent

    async def post(self, body: bytes, headers: Mapping[str, str]) -> Reply:
        """POST one JSON-RPC message; the reply is unread. Transport failures raise UpstreamError."""
        request = self.client.build_request("POST", self.url, content=body, headers=dict(headers))
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"agent {self.name} timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"agent {self.name} unreachable: {type(exc).__name__}") from exc
        stream = response.headers.get("content-type", "").startswith("text/event-stream")
        return Reply(response, self.cfg.max_response_bytes, long_lived=stream)

    async def card(self, version: str | None) -> dict[str, Any]:
        """The agent's card as it serves it (read with Bastion's credential, bounded)."""
        url = self.url.rstrip("/") + "/" + CARD_PATH
        headers = {k: v for k, v in self.headers(version, False).items() if k != "content-type"}
        try:
            async with self.client.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    why = f"agent {self.name} answered HTTP {response.status_code} for its card"
                    raise UpstreamError(why)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_CARD_BYTES:
                        raise UpstreamError(f"agent {self.name}'s card is over {MAX_CARD_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise UpstreamError(f"agent {self.name} unreachable: {type(exc).__name__}") from exc
        try:
            card = json.loads(body)
        except ValueError:
            card = None
        if not isinstance(card, dict):
            raise UpstreamError(f"agent {self.name}'s card is not a JSON object")
        return card


def message_schemas(agents: Mapping[str, AgentConfig]) -> dict[str, dict[str, Any]]:
    """`context.args` of messages to each agent, keyed apart from every `<upstream>/<tool>`, for
    the policy loader (which types `ToolArgs` from them)."""
    return {f"\x00agent\x00{name}": message_schema(cfg) for name, cfg in agents.items()}


def message_schema(cfg: AgentConfig) -> dict[str, Any]:
    """The JSON Schema of `context.args` for messages to this agent (it gives Cedar its type)."""
    text = {"type": "array", "items": {"type": "string"}}
    named = {"type": "string"}
    file = {"type": "object", "properties": {"name": named, "media_type": named, "url": named}}
    data = cfg.data_schema or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {
            "text": text,
            "data": data,
            "files": {"type": "array", "items": file},
            "metadata": {"type": "object", "properties": {}},
        },
    }
