"""Legacy MCP sessions as signed, self-contained ids, so any replica can serve any session.

A session id is `v1.<payload>.<mac>`: the payload names the upstream, a digest of the
principal that opened it, the upstream's own session id (if the upstream keeps sessions) and
the negotiated protocol version and the elicitation modes the client declared; the HMAC (key
shared by replicas) makes it unforgeable. The state of a session lives in the upstream, not in
Bastion's memory. A session presented with another principal's token, for another upstream, or
past its age is refused as unknown.

The same key seals other small values that travel through a client and must come back unchanged
(`seal` / `unseal`), each under its own purpose so that one kind can never pass for another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import SessionError


@dataclass(frozen=True, slots=True)
class Session:
    upstream: str
    principal: str
    upstream_session: str | None
    version: str
    elicitation: frozenset[str] = field(default_factory=frozenset)
    """The elicitation modes (`form`, `url`) the client declared at `initialize`."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    def __init__(self, key: bytes, max_age_s: float) -> None:
        self._key = key
        self._max_age = max_age_s

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest()[:20])

    @staticmethod
    def principal_digest(principal_key: str) -> str:
        return hashlib.sha256(principal_key.encode()).hexdigest()[:24]

    def mint(
        self,
        upstream: str,
        principal_key: str,
        upstream_session: str | None,
        version: str,
        elicitation: Iterable[str] = (),
    ) -> str:
        body: dict[str, Any] = {
            "u": upstream,
            "p": self.principal_digest(principal_key),
            "s": upstream_session,
            "v": version,
            "t": int(time.time()),
            "n": secrets.token_hex(8),  # unique per session (MCP), so call_ids derived from it are too
        }
        if modes := sorted(elicitation):
            body["e"] = modes
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"v1.{payload}.{self._mac(payload)}"

    def seal(self, purpose: str, principal_key: str, ttl_s: float, body: dict[str, Any]) -> str:
        """`body`, readable but unforgeable, bound to `purpose`, the principal and a deadline."""
        sealed = {**body, "p": self.principal_digest(principal_key), "x": int(time.time() + ttl_s)}
        payload = _b64(json.dumps(sealed, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(f'{purpose}.{payload}')}"

    def unseal(self, purpose: str, principal_key: str, token: str) -> dict[str, Any] | None:
        """The body of a token `seal` made for this purpose and principal, in time; else None."""
        payload, _, mac = token.rpartition(".")
        if len(token) > 4096 or not payload:
            return None
        if not hmac.compare_digest(mac, self._mac(f"{purpose}.{payload}")):
            return None
        try:
            body = json.loads(_unb64(payload))
        except ValueError:
            return None
        if (
            not isinstance(body, dict)
            or not hmac.compare_digest(str(body.get("p")), self.principal_digest(principal_key))
            or not isinstance(body.get("x"), int)
            or body["x"] < time.time()
        ):
            return None
        return body

    def open(self, token: str, upstream: str, principal_key: str) -> Session:
        unknown = SessionError("unknown or expired session: start a new one with initialize")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "v1" or len(token) > 2048:
            raise unknown
        if not hmac.compare_digest(parts[2], self._mac(parts[1])):
            raise unknown
        try:
            body = json.loads(_unb64(parts[1]))
        except ValueError as exc:
            raise unknown from exc
        if (
            body.get("u") != upstream
            or not hmac.compare_digest(str(body.get("p")), self.principal_digest(principal_key))
            or time.time() - float(body.get("t", 0)) > self._max_age
        ):
            raise unknown
        modes = body.get("e")
        elicitation = frozenset(m for m in modes if m in ("form", "url")) if isinstance(modes, list) else None
        return Session(upstream, principal_key, body.get("s"), str(body.get("v")), elicitation or frozenset())
