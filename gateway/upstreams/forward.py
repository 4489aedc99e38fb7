"""One client message sent to an upstream in the upstream's era, and the ids that must come back.

The MCP front reads a client's message in the client's era and hands it here as an `Outgoing`
value; this module speaks the upstream's era:

- modern upstream: the 2026-07-28 `_meta` and the `Mcp-Method` / `Mcp-Name` headers are added
  (a modern client's bytes go as they came, the headers rebuilt from validated values);
- legacy upstream with a session of the client's own: the client's bytes, in that session;
- a shared upstream session (stateless clients of a legacy upstream, and every client of a
  stdio or plain-HTTP upstream, which keep one session for all): the request id is replaced by a
  private one, so two clients that both send id 1 cannot collide, and the private id is
  remembered with its owner. A client may cancel only its own requests (`inflight`) and answer
  only the server requests relayed to it (`server_requests`); see `SharedSession`.

Upstream clients forward and report; what to refuse is decided by the front.
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gateway.upstreams.base import Upstream
from gateway.upstreams.streamable_http import MODERN_META, Reply, SharedSession

_ids = itertools.count(1)
MAX_REMEMBERED = 10_000
"""Private ids (and relayed server requests) remembered per upstream: the oldest go first."""


@dataclass(slots=True)
class Outgoing:
    """A client's JSON-RPC message bound for an upstream, as the client sent it."""

    msg: dict[str, Any]
    body: bytes | None
    """The client's bytes, sent as they are wherever the eras match and nothing was changed."""
    modern: bool
    """The client speaks 2026-07-28 (stateless)."""
    owner: str
    """Who sent it (principal and client session): private ids on a shared session belong to it."""
    session: str | None = None
    """The upstream session of the client's own legacy session (None: none of its own)."""
    version: str | None = None
    """The protocol version negotiated in the client's legacy session."""
    trace: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.msg.get("method", ""))

    @property
    def params(self) -> dict[str, Any]:
        params = self.msg.get("params")
        return params if isinstance(params, dict) else {}

    def with_params(self, **changes: Any) -> Outgoing:
        """A copy with some params replaced (redacted arguments): the client's bytes no longer apply."""
        msg = {**self.msg, "params": {**self.params, **changes}}
        return Outgoing(msg, None, self.modern, self.owner, self.session, self.version, self.trace)


@dataclass(frozen=True, slots=True)
class Private:
    """A request sent on a shared session under a private id; the answer gets `client_id` back."""

    id: str
    client_id: Any
    owner: str


def shared_session(up: Upstream, out: Outgoing, era: str) -> SharedSession | None:
    """The shared upstream session this message travels on, or None when the client has its own."""
    if era == "modern" or out.session is not None:
        return None
    return up.shared


def remember(table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    table[key] = value
    if len(table) > MAX_REMEMBERED:
        table.popitem(last=False)


async def send(up: Upstream, out: Outgoing, *, long_lived: bool = False) -> tuple[Reply, Private | None]:
    """Send `out` in the upstream's era; returns the reply (body unread) and the private id used."""
    era = await up.detect()
    method = out.method
    if era == "modern":
        name = out.params.get("uri") if method == "resources/read" else out.params.get("name")
        named = method in ("tools/call", "prompts/get", "resources/read") and isinstance(name, str)
        hdrs = up.modern_headers(method, name if named else None) | out.trace
        if out.modern and out.body is not None:
            return await up.send("POST", out.body, hdrs, long_lived=long_lived), None
        msg = dict(out.msg)
        if "method" in msg:
            msg["params"] = {**out.params, "_meta": {**(out.params.get("_meta") or {}), **MODERN_META}}
        return await up.send("POST", _dumps(msg), hdrs, long_lived=long_lived), None
    shared = shared_session(up, out, era)
    if shared is None:
        hdrs = {"mcp-protocol-version": out.version or up.shared.version, **out.trace}
        if out.session:
            hdrs["mcp-session-id"] = out.session
        body = out.body if out.body is not None and not out.modern else _dumps(_legacy(out))
        return await up.send("POST", body, hdrs, long_lived=long_lived), None
    msg = _legacy(out)
    private: Private | None = None
    if "id" in msg and "method" in msg:
        private = Private(f"bastion-{next(_ids)}", msg["id"], out.owner)
        msg["id"] = private.id
        remember(shared.inflight, (out.owner, _key(private.client_id)), private.id)
    body = _dumps(msg)
    for attempt in range(2):
        current = shared.id
        hdrs = {"mcp-protocol-version": shared.version, **out.trace}
        if current:
            hdrs["mcp-session-id"] = current
        reply = await up.send("POST", body, hdrs, long_lived=long_lived)
        if reply.status != 404 or attempt == 1:
            return reply, private
        await reply.aclose()
        await up.reopen_shared(current)
    raise AssertionError("unreachable")


def release(up: Upstream, private: Private | None) -> None:
    """The request under `private` was answered: it can no longer be cancelled."""
    if private is not None:
        up.shared.inflight.pop((private.owner, _key(private.client_id)), None)


def _key(client_id: Any) -> str:
    """JSON-RPC ids 1 and "1" are different requests."""
    return f"{type(client_id).__name__}:{client_id}"


def private_id_of(up: Upstream, owner: str, client_id: Any) -> str | None:
    """The private id of `owner`'s request `client_id` still in flight on the shared session."""
    found = up.shared.inflight.get((owner, _key(client_id)))
    return str(found) if found is not None else None


def _legacy(out: Outgoing) -> dict[str, Any]:
    """The message without the 2026-07-28 `_meta` entries a legacy server does not know."""
    msg = dict(out.msg)
    if "method" in msg and out.modern:
        params = dict(out.params)
        meta = {
            k: v
            for k, v in (params.get("_meta") or {}).items()
            if not k.startswith("io.modelcontextprotocol/")
        }
        params.pop("_meta", None)
        if meta:
            params["_meta"] = meta
        msg["params"] = params
    return msg


def _dumps(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()
