"""API keys for service agents: `Authorization: Bearer bst_<prefix>_<secret>`.

A key is 12 hex characters of public prefix and 256 random bits of secret. Only the SHA-256 of
the whole key is stored (in `identity.api_keys` or the state database), and a presented key is
found by its prefix and compared in constant time. A slow hash (scrypt, argon2) protects
passwords people chose; a 256-bit random secret cannot be guessed from its SHA-256, and a slow
hash would cost tens of milliseconds of CPU on every call, an easy denial-of-service lever.

Keys in the state database are looked up once and then cached for `CACHE_S`: a key revoked with
`bastion keys revoke` stops working on every replica within that time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.call import API_KEY_ISSUER, Identities, Principal
from gateway.config import ApiKeyConfig
from gateway.errors import AuthError, ConfigError
from gateway.state.db import api_keys_table, open_state

KEY_PREFIX = "bst_"
CACHE_S = 30.0
CACHE_SIZE = 10_000
_KEY = re.compile(r"bst_([a-z0-9]{8,32})_([A-Za-z0-9_-]{20,128})")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: its prefix, the hash of the whole key, and the principal it stands for."""

    prefix: str
    sha256: str
    sub: str
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    tenant: str | None = None
    email: str | None = None
    scopes: tuple[str, ...] = ()
    expires: datetime | None = None
    revoked: datetime | None = None
    created: datetime | None = None
    description: str | None = None
    source: str = "state"

    def principal(self, identities: Identities) -> Principal:
        """The key's principal; its id is qualified (`bastion:api-key#<sub>`) unless API keys
        are the only issuer or are grouped with another in `identity.same_identity`."""
        claims: dict[str, Any] = {"sub": self.sub, "iss": API_KEY_ISSUER, "key_prefix": self.prefix}
        if self.scopes:
            claims["scope"] = " ".join(self.scopes)
        return Principal(
            sub=self.sub,
            issuer=API_KEY_ISSUER,
            groups=frozenset(self.groups),
            roles=frozenset(self.roles),
            tenant=self.tenant,
            email=self.email,
            agent=f"api-key:{self.prefix}",
            scopes=frozenset(self.scopes),
            claims=MappingProxyType(claims),
            id=identities.id_of(API_KEY_ISSUER, self.sub),
        )


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """A fresh key: (the key to hand out once, its prefix, its SHA-256)."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, digest(key)


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


def from_config(entry: ApiKeyConfig) -> ApiKey:
    return ApiKey(
        prefix=entry.prefix,
        sha256=entry.sha256,
        sub=entry.sub,
        groups=tuple(entry.groups),
        roles=tuple(entry.roles),
        tenant=entry.tenant,
        email=entry.email,
        scopes=tuple(entry.scopes),
        expires=_aware(entry.expires),
        source="config",
    )


class ApiKeyStore:
    """Keys in the state database (`state.url`), table `bastion_api_keys`."""

    def __init__(self, engine: AsyncEngine, owned: bool = False) -> None:
        self._engine = engine
        self._owned = owned

    @classmethod
    async def open(cls, url: str) -> ApiKeyStore:
        """A store on its own engine (the `bastion keys` commands); the gateway shares its state engine."""
        return cls(await open_state(url), owned=True)

    async def close(self) -> None:
        if self._owned:
            await self._engine.dispose()

    async def create(
        self,
        sub: str,
        *,
        groups: Sequence[str] = (),
        roles: Sequence[str] = (),
        tenant: str | None = None,
        email: str | None = None,
        scopes: Sequence[str] = (),
        expires: datetime | None = None,
        description: str | None = None,
    ) -> tuple[str, ApiKey]:
        """Store a new key for `sub`; returns the key itself (shown once, never stored) and its record."""
        key, prefix, sha = new_key()
        record = ApiKey(
            prefix, sha, sub, tuple(groups), tuple(roles), tenant, email, tuple(scopes), _aware(expires)
        )
        attributes = {
            "groups": list(groups),
            "roles": list(roles),
            "tenant": tenant,
            "email": email,
            "scopes": list(scopes),
        }
        async with self._engine.begin() as conn:
            await conn.execute(
                api_keys_table.insert().values(
                    prefix=prefix,
                    sha256=sha,
                    sub=sub,
                    attributes=attributes,
                    created_at=datetime.now(UTC),
                    expires_at=record.expires,
                    description=description,
                )
            )
        return key, record

    async def get(self, prefix: str) -> ApiKey | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(api_keys_table).where(api_keys_table.c.prefix == prefix))
            ).first()
        return None if row is None else _from_row(row._mapping)

    async def list(self) -> list[ApiKey]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(api_keys_table).order_by(api_keys_table.c.created_at))
            return [_from_row(r._mapping) for r in rows]

    async def revoke(self, prefix: str) -> bool:
        """Mark a key revoked; False if there is no such key (or it was already revoked)."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys_table)
                .where(api_keys_table.c.prefix == prefix, api_keys_table.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        return bool(result.rowcount)


def _from_row(row: Any) -> ApiKey:
    attrs = row["attributes"] or {}
    return ApiKey(
        prefix=row["prefix"],
        sha256=row["sha256"],
        sub=row["sub"],
        groups=tuple(attrs.get("groups") or ()),
        roles=tuple(attrs.get("roles") or ()),
        tenant=attrs.get("tenant"),
        email=attrs.get("email"),
        scopes=tuple(attrs.get("scopes") or ()),
        expires=_aware(row["expires_at"]),
        revoked=_aware(row["revoked_at"]),
        created=_aware(row["created_at"]),
        description=row["description"],
    )


class ApiKeys:
    """Authenticates `bst_` keys: config entries first, then the state database (cached)."""

    def __init__(
        self, configured: Iterable[ApiKeyConfig], state_url: str | None, identities: Identities
    ) -> None:
        self._configured = {k.prefix: from_config(k) for k in configured}
        self._state_url = state_url
        self._identities = identities
        self._store: ApiKeyStore | None = None

    def use(self, engine: AsyncEngine) -> None:
        """Look keys up on the gateway's state engine (one pool for all state) instead of opening one."""
        self._store = ApiKeyStore(engine)
        self._open_lock = asyncio.Lock()
        self._cache: OrderedDict[str, tuple[float, ApiKey | None]] = OrderedDict()

    async def aclose(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def authenticate(self, token: str) -> Principal:
        match = _KEY.fullmatch(token)
        if match is None:
            raise AuthError("malformed API key: expected bst_<prefix>_<secret>")
        prefix = match.group(1)
        key = self._configured.get(prefix) or await self._lookup(prefix)
        if key is None or not hmac.compare_digest(digest(token), key.sha256):
            raise AuthError("unknown API key")
        if key.revoked is not None:
            raise AuthError(f"API key {prefix} was revoked")
        if key.expires is not None and key.expires <= datetime.now(UTC):
            raise AuthError(f"API key {prefix} has expired")
        return key.principal(self._identities)

    async def _lookup(self, prefix: str) -> ApiKey | None:
        if self._state_url is None:
            return None
        now = time.monotonic()
        hit = self._cache.get(prefix)
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1]
        try:
            store = await self._open()
            key = await store.get(prefix)
        except (ConfigError, SQLAlchemyError, OSError) as exc:
            raise AuthError("API keys cannot be checked: the state database is unavailable") from exc
        self._cache[prefix] = (now, key)
        self._cache.move_to_end(prefix)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return key

    async def _open(self) -> ApiKeyStore:
        async with self._open_lock:
            if self._store is None:
                assert self._state_url is not None
                self._store = await ApiKeyStore.open(self._state_url)
            return self._store
