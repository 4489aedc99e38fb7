"""Browser sessions for the console, and the tokens that guard its forms.

A browser cannot send an admin's Bearer token on a page load, so `bastion console login` (run by
an operator where the config and `data_dir` are) prints a link good for `console.login_ttl_s`
and for one use; opening it sets a session cookie (HttpOnly, SameSite=Strict, Secure on https,
path `/console`) for `console.session_ttl_s`. Links and cookies are HMAC-signed with the key in
`console.key_file` (default `data_dir/console.key`; replicas share one); whether the session's
user is an admin is checked again on every request, against the config as it is then. Every
form carries a token bound to the session (HMAC), and a cross-origin POST is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.call import Principal
from gateway.keyfiles import load_or_create_secret

COOKIE = "bastion_console"
_MAX_TOKEN = 4096


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    user: str
    """The admin's id as the config names users (`admin.subjects`, docs/identity.md)."""
    issuer: str
    groups: frozenset[str]
    expires_at: float

    def principal(self) -> Principal:
        sub = self.user.rpartition("#")[2] if self.user.startswith(f"{self.issuer}#") else self.user
        return Principal(sub=sub, issuer=self.issuer, groups=self.groups, id=self.user)


class ConsoleKeys:
    """Signs and checks login links, session cookies and form tokens."""

    def __init__(self, key_file: Path) -> None:
        self._key = load_or_create_secret(key_file)

    def _sign(self, kind: str, payload: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).rstrip(b"=")
        mac = hmac.new(self._key, kind.encode() + b"\x00" + body, hashlib.sha256).digest()
        return body.decode() + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def _open(self, kind: str, token: str) -> dict[str, Any] | None:
        if not token or len(token) > _MAX_TOKEN or token.count(".") != 1:
            return None
        body, _, mac = token.partition(".")
        want = hmac.new(self._key, kind.encode() + b"\x00" + body.encode(), hashlib.sha256).digest()
        try:
            got = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (ValueError, UnicodeDecodeError):
            return None
        if not hmac.compare_digest(got, want) or not isinstance(payload, dict):
            return None
        exp = payload.get("exp")
        if not isinstance(exp, (int, float)) or exp < time.time():
            return None
        return payload

    def login_link(self, user: str, issuer: str, groups: list[str], ttl_s: float) -> str:
        """The token of a one-time login link (the caller checked that `user` is an admin)."""
        payload = {
            "user": user, "iss": issuer, "groups": sorted(groups),
            "nonce": secrets.token_urlsafe(18), "exp": time.time() + ttl_s,
        }  # fmt: skip
        return self._sign("login", payload)

    def open_login(self, token: str) -> tuple[Session, str, float] | None:
        """(the session it grants, minus its lifetime; the nonce to spend; when the link expires)."""
        p = self._open("login", token)
        grant = _session_of(p, "")
        if p is None or grant is None or not isinstance(p.get("nonce"), str):
            return None
        return grant, str(p["nonce"]), float(p["exp"])

    def session_cookie(self, session: Session, ttl_s: float) -> tuple[Session, str]:
        s = Session(
            secrets.token_urlsafe(18), session.user, session.issuer, session.groups, time.time() + ttl_s
        )
        payload = {
            "sid": s.sid,
            "user": s.user,
            "iss": s.issuer,
            "groups": sorted(s.groups),
            "exp": s.expires_at,
        }
        return s, self._sign("session", payload)

    def open_session(self, cookie: str | None) -> Session | None:
        p = self._open("session", cookie or "")
        sid = p.get("sid") if p else None
        return _session_of(p, sid) if isinstance(sid, str) and sid else None

    def form_token(self, session_id: str) -> str:
        """What every form of this session carries (bound to the session, so it cannot be guessed)."""
        return hmac.new(self._key, b"form\x00" + session_id.encode(), hashlib.sha256).hexdigest()


def _session_of(p: dict[str, Any] | None, sid: str) -> Session | None:
    """The session a signed payload names, if its fields have the right types."""
    if p is None:
        return None
    user, issuer, groups = p.get("user"), p.get("iss"), p.get("groups")
    if not (isinstance(user, str) and user and isinstance(issuer, str) and isinstance(groups, list)):
        return None
    if not all(isinstance(g, str) for g in groups):
        return None
    return Session(sid, user, issuer, frozenset(groups), float(p["exp"]))
