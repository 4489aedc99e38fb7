"""One client POST on its way through the MCP front, and the values read off its wire."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from gateway.call import Principal
from gateway.fronts.mcp.sessions import Session
from gateway.fronts.wire import traceparent
from gateway.upstreams.base import Upstream
from gateway.upstreams.forward import Outgoing

CALL_ID_META = "bastion/call_id"


@dataclass(slots=True)
class Exchange:
    """One client POST on its way through the front."""

    upstream: Upstream
    principal: Principal
    msg: dict[str, Any]
    body: bytes
    session: Session | None
    session_id: str | None
    modern: bool
    trace_id: str | None
    client: str | None = None
    elicitation: frozenset[str] = frozenset()
    """The elicitation modes the client supports (declared at `initialize`, or per request in 2026)."""
    request: Request | None = None
    """The client's HTTP request, so that an inline approval's wait notices when the client leaves."""

    @property
    def method(self) -> str:
        return str(self.msg.get("method", ""))

    @property
    def params(self) -> dict[str, Any]:
        params = self.msg.get("params")
        return params if isinstance(params, dict) else {}

    @property
    def owner(self) -> str:
        """Who owns the requests of this exchange on a shared upstream session: the principal,
        within its client session when it has one."""
        return f"{self.principal.key}\x00{self.session_id or ''}"

    def outgoing(self) -> Outgoing:
        """The message as the upstream layer takes it (the client's era, its own session if any)."""
        session = self.session
        trace = traceparent(self.trace_id) if self.trace_id else {}
        return Outgoing(
            self.msg,
            self.body,
            self.modern,
            self.owner,
            session.upstream_session if session else None,
            session.version if session else None,
            trace,
        )


def stable_call_id(x: Exchange, from_session: bool) -> str | None:
    """A call_id that names this call and no other: the client's `_meta["bastion/call_id"]`, or
    the legacy session with the request id (ids are unique within a session). A stateless
    client's bare request id is not one: every new client counts from the same start."""
    meta = x.params.get("_meta")
    given = meta.get(CALL_ID_META) if isinstance(meta, dict) else None
    if isinstance(given, str) and 0 < len(given) <= 200:
        return given
    msg_id = x.msg.get("id")
    if not from_session or x.session_id is None or msg_id is None:
        return None
    return f"s-{hashlib.sha256(x.session_id.encode()).hexdigest()[:24]}-{str(msg_id)[:150]}"


def call_id_of(msg: dict[str, Any]) -> str | None:
    msg_id = msg.get("id")
    return None if msg_id is None else str(msg_id)[:200]
