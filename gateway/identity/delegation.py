"""Delegation tokens: what Bastion hands an agent it forwards work to, so its next call is governed.

When Bastion forwards an A2A message to agent B on behalf of a principal (alice, perhaps through
agent A), it adds a short-lived token in the `X-Bastion-Delegation` header. B presents it back to
Bastion as its Bearer credential when it passes the work on (to agent C, or to a tool), and
Bastion reads it as: alice, acted for by B, then A (RFC 8693 `act`, the current actor first).
So every hop is decided by Cedar with the chain so far, budgets charge every actor, and the
chain grows by one at each hop; an agent already in it cannot be called again (a cycle).

The token is an HS256 JWT signed with a key only Bastion holds (`a2a.delegation_key_file`,
shared by replicas). It carries the principal as Bastion verified it (issuer, groups, roles,
tenant, email, the effective scopes), so the user stays the same user (the same budgets, the same
`User::` in Cedar) and a delegate never holds more scopes than its delegator. It is meant for
Bastion only (`aud` is Bastion's URL) and is never an admin credential.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt

from gateway.call import Principal

ISSUER = "bastion:delegation"
"""The `iss` of every delegation token; no configured issuer may use it."""
TOKEN_TYPE = "bastion-delegation+jwt"  # noqa: S105 (a media type, not a secret)
HEADER = "x-bastion-delegation"
"""The request header an agent finds its delegation token in."""
_ALGORITHM = "HS256"


class Delegations:
    """Mints and verifies delegation tokens with one key."""

    def __init__(self, key: bytes, audience: str, ttl_s: float, leeway_s: float = 30) -> None:
        if len(key) < 32:
            raise ValueError("a delegation key needs at least 32 bytes")
        self._key = key
        self.audience = audience
        self.ttl_s = ttl_s
        self._leeway = leeway_s

    def mint(self, principal: Principal, actor: str) -> str:
        """A token naming `principal`, now acted for by `actor`, then by its earlier actors (the
        software the principal called through, `azp`, counts as the first of them)."""
        act: dict[str, Any] | None = None
        before = principal.delegation_chain or ((principal.agent,) if principal.agent else ())
        for earlier in reversed((actor, *before)):
            act = {"sub": earlier} if act is None else {"sub": earlier, "act": act}
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": self.audience,
            "sub": principal.sub,
            "iat": now,
            "exp": now + int(self.ttl_s),
            "jti": secrets.token_urlsafe(12),
            "act": act,
            "scope": " ".join(sorted(principal.scopes)),
            "bastion": {
                "issuer": principal.issuer,
                "groups": sorted(principal.groups),
                "roles": sorted(principal.roles),
                "tenant": principal.tenant,
                "email": principal.email,
            },
        }
        return jwt.encode(claims, self._key, _ALGORITHM, headers={"typ": TOKEN_TYPE})

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; `jwt.PyJWTError` when it is not one of ours, is expired or altered."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self._key,
            algorithms=[_ALGORITHM],
            audience=self.audience,
            issuer=ISSUER,
            leeway=self._leeway,
            options={"require": ["exp", "iat", "sub", "aud", "iss", "act", "bastion"]},
        )
        if not isinstance(claims.get("bastion"), dict):
            raise jwt.InvalidTokenError("malformed delegation token")
        return claims


def is_delegation(token: str) -> bool:
    """Whether a token says it is a delegation token (its signature is checked by `verify`)."""
    try:
        return jwt.get_unverified_header(token).get("typ") == TOKEN_TYPE
    except jwt.PyJWTError:
        return False
