"""The identity stage: turns a Bearer JWT into a verified `Principal`, or refuses it with a reason.

Keys come only from configuration (a JWKS file, a PEM file, a JWKS URL or OIDC discovery), never
from the token (`jku`, `x5u`, `jwk` and `x5c` headers are ignored). Remote key sets are fetched
with httpx, never with PyJWT's synchronous `PyJWKClient`, and the last good set is kept when the
identity provider is unreachable, for at most `jwks_stale_s` past the TTL: then the issuer's
tokens are refused until a fetch succeeds. A verified token is cached until its `exp`, so the
agent that reuses one token for many calls pays for the signature check once.

API keys (`Bearer bst_...`, see `gateway.identity.apikeys`) are told apart from JWTs by their prefix.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

import httpx
import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.exceptions import InvalidSubjectError

from gateway.call import Principal
from gateway.config import IdentityConfig, IssuerConfig
from gateway.errors import AuthError, ConfigError, InsufficientScope
from gateway.identity.apikeys import ApiKeys, looks_like_key
from gateway.identity.delegation import ISSUER as DELEGATION_ISSUER
from gateway.identity.delegation import Delegations, is_delegation

log = logging.getLogger(__name__)

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

UNKNOWN_KID_REFETCH_S = 30.0
"""At most one key refetch per issuer in this window (or jwks_ttl_s, if shorter) for unknown kids."""
NO_KEYS_REFETCH_S = 5.0
"""While an issuer has no usable keys, how often a token may trigger another fetch attempt."""
FETCH_TIMEOUT_S = 5.0
MAX_KEY_DOCUMENT_BYTES = 1 << 20
CACHE_SIZE = 10_000
MAX_ECHO = 100
MAX_KID = 256

_JWS_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_LIST_SPLIT = re.compile(r"[\s,]+")
_MIN_RSA_BITS = 2048
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}


def _clip(value: object, limit: int = MAX_ECHO) -> str:
    """Attacker-controlled text made safe to echo: printable ASCII, at most `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    clipped = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return clipped + "..." if len(text) > limit else clipped


def _invalid(message: str) -> AuthError:
    return AuthError(message, error="invalid_token")


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    key: PublicKey
    alg: str | None
    """The JWK's own `alg`, when it declares one: then only that algorithm may use the key."""

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        if alg.startswith(("RS", "PS")):
            return isinstance(self.key, rsa.RSAPublicKey)
        if alg in _EC_CURVES:
            return isinstance(self.key, ec.EllipticCurvePublicKey) and self.key.curve.name == _EC_CURVES[alg]
        if alg == "EdDSA":
            return isinstance(self.key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        return False


@dataclass(frozen=True, slots=True)
class _KeySet:
    keys: tuple[_Key, ...]
    fingerprint: str
    by_kid: dict[str, _Key] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_kid", {k.kid: k for k in self.keys if k.kid is not None})

    def lookup(self, kid: str | None) -> _Key | None:
        if kid is not None and kid in self.by_kid:
            return self.by_kid[kid]
        if len(self.keys) == 1 and (kid is None or self.keys[0].kid is None):
            return self.keys[0]
        return None


def _public(key: object) -> PublicKey | None:
    if isinstance(
        key,
        rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
    ):
        key = key.public_key()
    if isinstance(
        key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
    ):
        return key
    return None


def _fingerprint(keys: Iterable[_Key]) -> str:
    parts = []
    for k in keys:
        der = k.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        parts.append(f"{k.kid}|{k.alg}|{der.hex()}")
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


def _usable(key: PublicKey) -> bool:
    return not (isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS)


def _keyset_from_jwks(document: object, source: str) -> _KeySet:
    """Build a key set from a JWKS (or a single JWK); keys for encryption or too weak are skipped."""
    if isinstance(document, dict) and "keys" not in document and "kty" in document:
        document = {"keys": [document]}
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{source} is not a JWKS document (no 'keys' list)")
    keys: list[_Key] = []
    for jwk_dict in document["keys"]:
        if not isinstance(jwk_dict, dict) or jwk_dict.get("use", "sig") != "sig":
            continue
        kid = jwk_dict.get("kid")
        try:
            jwk = jwt.PyJWK.from_dict(jwk_dict)
        except jwt.PyJWTError as exc:
            log.warning("%s: skipping key %s: %s", source, _clip(kid), exc)
            continue
        public = _public(jwk.key)
        if public is None or not _usable(public):
            log.warning("%s: skipping key %s: not an RSA >= 2048, EC or EdDSA public key", source, _clip(kid))
            continue
        alg = jwk_dict.get("alg")
        keys.append(
            _Key(kid if isinstance(kid, str) else None, public, alg if isinstance(alg, str) else None)
        )
    if not keys:
        raise ValueError(f"{source} contains no usable signing keys")
    return _KeySet(tuple(keys), _fingerprint(keys))


def _keyset_from_pem(data: bytes, source: str) -> _KeySet:
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            loaded: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            loaded = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{source} is not a PEM public key or certificate: {exc}") from exc
    public = _public(loaded)
    if public is None or not _usable(public):
        raise ValueError(f"{source}: not an RSA >= 2048, EC or EdDSA public key")
    keys = (_Key(None, public, None),)
    return _KeySet(keys, _fingerprint(keys))


def _load_file_keys(cfg: IssuerConfig) -> _KeySet:
    path = cfg.jwks_file or cfg.public_key_file
    if path is None:
        raise ConfigError(f"identity issuer {cfg.issuer!r}: no key source (jwks_file or public_key_file)")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"identity issuer {cfg.issuer!r}: cannot read {path}: {exc.strerror}") from exc
    try:
        if cfg.jwks_file is not None:
            try:
                document = json.loads(data)
            except ValueError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from exc
            return _keyset_from_jwks(document, str(path))
        return _keyset_from_pem(data, str(path))
    except ValueError as exc:
        raise ConfigError(f"identity issuer {cfg.issuer!r}: {exc}") from exc


class _FetchError(Exception):
    pass


@dataclass(slots=True)
class _IssuerState:
    cfg: IssuerConfig
    audiences: tuple[str, ...]
    keys: _KeySet | None = None
    fetched_at: float = -math.inf
    last_attempt: float = -math.inf
    last_forced: float = -math.inf
    last_error: str | None = None
    jwks_uri: str | None = None
    inflight: asyncio.Task[None] | None = None

    @property
    def remote(self) -> bool:
        return self.cfg.jwks_url is not None or self.cfg.discovery


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal
    exp: float
    issuer: _IssuerState
    audiences: frozenset[str]


def _segment(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        return None


def _strings(value: Any, claim: str) -> frozenset[str]:
    """A list claim as a set: a JSON list of strings, or one space/comma separated string."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(v for v in _LIST_SPLIT.split(value) if v)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise _invalid(f"claim {claim} must be a list of strings or a space separated string")


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name; a dotted name that is not a claim itself walks nested objects (Keycloak)."""
    if name in claims or "." not in name:
        return claims.get(name)
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = _claim(claims, name)
    if value is None or isinstance(value, str):
        return value
    raise _invalid(f"claim {name} must be a string")


def _scopes_of(node: Mapping[str, Any], where: str) -> frozenset[str] | None:
    """`scope` (RFC 8693/9068, space separated) or `scp` (a list); None when neither is present."""
    for name in ("scope", "scp"):
        if name in node:
            return _strings(node[name], where + name)
    return None


def _delegation(claims: Mapping[str, Any], max_depth: int) -> tuple[tuple[str, ...], frozenset[str]]:
    """The RFC 8693 `act` chain (current actor first) and the effective scopes.

    Each nested `act` is an earlier actor. An actor may carry its own scope claim; the effective
    scopes are the intersection of the token's and every actor's, so a delegate never holds more
    than its delegator. A party appearing twice (the subject included) is a cycle and refused.
    """
    scopes = _scopes_of(claims, "") or frozenset()
    chain: list[str] = []
    seen = {claims["sub"]}
    act = claims.get("act")
    while act is not None:
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise _invalid("act claim must be an object with a sub string")
        if len(chain) >= max_depth:
            raise _invalid(f"delegation chain longer than identity.max_delegation_depth ({max_depth})")
        actor = act["sub"]
        if actor in seen:
            raise _invalid(f"delegation cycle: {_clip(actor)} appears twice in the chain")
        seen.add(actor)
        chain.append(actor)
        own = _scopes_of(act, "act." * len(chain))
        if own is not None:
            scopes &= own
        act = act.get("act")
    return tuple(chain), scopes


def require_scopes(principal: Principal, required: Iterable[str]) -> None:
    """Raise `InsufficientScope` naming every required scope when the principal lacks one."""
    needed = sorted(set(required))
    missing = [s for s in needed if s not in principal.scopes]
    if missing:
        raise InsufficientScope(f"token lacks scope {' '.join(missing)}", " ".join(needed))


class Authenticator:
    """Verifies Bearer JWTs against the configured issuers and maps their claims to a `Principal`."""

    def __init__(
        self,
        cfg: IdentityConfig,
        base_url: str,
        upstreams: Iterable[str],
        *,
        http_client: httpx.AsyncClient | None = None,
        state_url: str | None = None,
        providers: Iterable[str] = (),
        agents: Iterable[str] = (),
        delegations: Delegations | None = None,
    ) -> None:
        self._cfg = cfg
        self.delegations = delegations
        """Verifies the tokens Bastion hands the agents it forwards to (None: no agents, none accepted)."""
        base = base_url.rstrip("/")
        default_audiences = (
            base,
            *(f"{base}/mcp/{name}" for name in upstreams),
            *(f"{base}/llm/{name}" for name in providers),
            *(f"{base}/a2a/{name}" for name in agents),
        )
        self._issuers: dict[str, _IssuerState] = {}
        for i, issuer in enumerate(cfg.issuers):
            if issuer.issuer == DELEGATION_ISSUER:
                raise ConfigError(f"identity.issuers.{i}: {DELEGATION_ISSUER!r} is Bastion's own issuer")
            if issuer.issuer in self._issuers:
                raise ConfigError(f"identity.issuers.{i}: issuer {issuer.issuer!r} is configured twice")
            if issuer.audiences == []:
                raise ConfigError(f"identity.issuers.{i}.audiences: empty; remove it to use the defaults")
            audiences = tuple(issuer.audiences) if issuer.audiences else default_audiences
            self._issuers[issuer.issuer] = _IssuerState(issuer, audiences)
        self._base = base
        self._client = http_client
        self._own_client = http_client is None
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self.cache_size = CACHE_SIZE
        try:
            self.identities = cfg.identities()
        except ValueError as exc:
            raise ConfigError(f"identity: {exc}") from None
        """How principals are named (`Principal.id`); admin checks resolve config entries with it."""
        self.api_keys = ApiKeys(cfg.api_keys, state_url, self.identities)

    @property
    def issuers(self) -> list[str]:
        return list(self._issuers)

    def audiences(self, issuer: str) -> tuple[str, ...]:
        """The `aud` values accepted for tokens of `issuer`."""
        return self._issuers[issuer].audiences

    async def start(self) -> None:
        """Load every issuer's keys once. A bad key file stops start-up; an unreachable URL does not."""
        remote = []
        for st in self._issuers.values():
            if st.remote:
                remote.append(st)
            else:
                self._install(st, await asyncio.to_thread(_load_file_keys, st.cfg))
        if remote and self._client is None:
            self._client = httpx.AsyncClient(
                timeout=FETCH_TIMEOUT_S, follow_redirects=False, headers={"Accept": "application/json"}
            )
        await asyncio.gather(*(self._refresh(st) for st in remote))

    async def aclose(self) -> None:
        tasks = [st.inflight for st in self._issuers.values() if st.inflight and not st.inflight.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None and self._own_client:
            await self._client.aclose()
        self._client = None
        await self.api_keys.aclose()

    async def authenticate(
        self,
        authorization: str | None,
        upstream: str | None = None,
        *,
        gateway_only: bool = False,
        provider: str | None = None,
        agent: str | None = None,
    ) -> Principal:
        """The verified principal for an `Authorization` header value, or `AuthError`.

        With `upstream`, a token of an issuer using the default audiences must be meant for that
        upstream's resource URI (or for the whole gateway): a token minted for another upstream
        is refused (RFC 8707); likewise `provider` for `/llm/<provider>`, `agent` for
        `/a2a/<agent>`. With `gateway_only` (the admin API), it must be meant for the gateway
        itself (`listen.public_url`): a token an upstream's client obtained for that upstream is
        no admin credential, whoever it names. An issuer's own `audiences` list names Bastion as a
        whole, so its tokens are accepted; API keys have no audience.
        """
        if not authorization or not authorization.strip():
            raise AuthError("missing bearer token", error="invalid_request")
        limit = self._cfg.max_token_bytes
        if len(authorization) > limit + 64:
            raise _invalid(f"token larger than {limit} bytes")
        scheme, *rest = authorization.split(None, 1)
        if scheme.lower() != "bearer":
            raise AuthError(
                f"unsupported authorization scheme {_clip(scheme, 20)}; use Bearer", error="invalid_request"
            )
        token = rest[0].strip() if rest else ""
        if not token:
            raise AuthError("missing bearer token", error="invalid_request")
        raw = token.encode("utf-8", "replace")
        if len(raw) > limit:
            raise _invalid(f"token larger than {limit} bytes")
        if looks_like_key(token):
            return await self.api_keys.authenticate(token)
        if self.delegations is not None and is_delegation(token):
            if gateway_only:
                raise _invalid("a delegation token is no admin credential")
            return self._delegated(self.delegations, token)

        digest = hashlib.sha256(raw).digest()
        hit = self._cache.get(digest)
        if hit is not None and time.time() < hit.exp and not self._past_stale(hit.issuer):
            self._cache.move_to_end(digest)
            self._refresh_if_stale(hit.issuer)
        else:
            if hit is not None:
                del self._cache[digest]
            hit = await self._verify(token)
            self._cache[digest] = hit
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if hit.issuer.cfg.audiences is None:
            if gateway_only and self._base not in hit.audiences:
                raise _invalid(f"audience not accepted: the admin API needs a token meant for {self._base}")
            path = (
                f"mcp/{upstream}"
                if upstream is not None
                else f"llm/{provider}"
                if provider
                else f"a2a/{agent}"
                if agent
                else None
            )
            if path is not None and self._base not in hit.audiences:
                resource = f"{self._base}/{path}"
                if resource not in hit.audiences:
                    raise _invalid(f"audience not accepted: the token is not meant for {resource}")
        return hit.principal

    def www_authenticate(self, resource_metadata_url: str, error: AuthError | None) -> str:
        """The `WWW-Authenticate` value for a 401 or 403 (RFC 6750 + RFC 9728 `resource_metadata`)."""
        value = f'Bearer resource_metadata="{_quote(resource_metadata_url)}"'
        if error is not None:
            value += f', error="{_quote(error.error)}"'
            if isinstance(error, InsufficientScope):
                value += f', scope="{_quote(error.scope)}"'
            value += f', error_description="{_quote(error.message)}"'
        return value

    async def _verify(self, token: str) -> _Cached:
        if not _JWS_COMPACT.fullmatch(token):
            raise _invalid("malformed token: expected a signed JWT (three base64url parts)")
        header_b64, payload_b64, _ = token.split(".")
        header = _segment(header_b64)
        if not isinstance(header, dict):
            raise _invalid("malformed token header")
        unverified = _segment(payload_b64)
        if not isinstance(unverified, dict):
            raise _invalid("malformed token payload")
        iss = unverified.get("iss")
        if iss is None:
            raise _invalid("token has no iss claim")
        st = self._issuers.get(iss) if isinstance(iss, str) else None
        if st is None:
            raise _invalid(f"issuer {_clip(iss)} is not trusted")
        name = st.cfg.issuer

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in st.cfg.algorithms:
            raise _invalid(f"algorithm {_clip(alg, 20)} not allowed for issuer {name}")
        if "crit" in header:
            raise _invalid("critical header parameters (crit) are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _invalid("kid header must be a string")
        if kid is not None and (len(kid) > MAX_KID or not all(" " <= c <= "~" for c in kid)):
            raise _invalid(f"kid header is not a plausible key id (printable ASCII, at most {MAX_KID})")

        key = await self._key_for(st, kid)
        if not key.fits(alg):
            raise _invalid(f"algorithm {alg} does not match the key {_clip(key.kid)} of issuer {name}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=st.audiences,
                issuer=name,
                leeway=self._cfg.leeway_s,
                options={"require": ["exp", "iss", "sub", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as exc:
            raise _invalid(_describe(exc)) from exc
        aud = claims["aud"]
        audiences = frozenset([aud] if isinstance(aud, str) else aud)
        return _Cached(self._principal(name, claims), float(claims["exp"]), st, audiences)

    def _past_stale(self, st: _IssuerState) -> bool:
        """True once a remote issuer's keys are older than `jwks_ttl_s + jwks_stale_s`."""
        return (
            st.remote
            and st.keys is not None
            and time.monotonic() - st.fetched_at >= st.cfg.jwks_ttl_s + st.cfg.jwks_stale_s
        )

    async def _forced_refresh(self, st: _IssuerState, window: float) -> None:
        """Wait for a refetch: join the one in flight, else start one unless one ran within `window`."""
        if st.inflight is not None and not st.inflight.done():
            await asyncio.shield(st.inflight)
            return
        now = time.monotonic()
        if now - st.last_forced >= window:
            st.last_forced = now
            await asyncio.shield(self._start_refresh(st))

    async def _key_for(self, st: _IssuerState, kid: str | None) -> _Key:
        name = st.cfg.issuer
        if st.remote:
            ttl = st.cfg.jwks_ttl_s
            if self._past_stale(st):
                await self._forced_refresh(st, min(NO_KEYS_REFETCH_S, ttl))
                if self._past_stale(st):
                    age = time.monotonic() - st.fetched_at
                    window = st.cfg.jwks_ttl_s + st.cfg.jwks_stale_s
                    raise _invalid(
                        f"signing keys of issuer {name} are stale: the last successful fetch was"
                        f" {age:.0f} s ago, past jwks_ttl_s + jwks_stale_s ({window:g} s)"
                    )
            self._refresh_if_stale(st)
            if st.keys is None or st.keys.lookup(kid) is None:
                window = UNKNOWN_KID_REFETCH_S if st.keys is not None else NO_KEYS_REFETCH_S
                await self._forced_refresh(st, min(window, ttl))
        keys = st.keys
        if keys is None:
            raise _invalid(f"signing keys of issuer {name} are unavailable (the key fetch failed)")
        key = keys.lookup(kid)
        if key is None:
            if kid is None:
                raise _invalid(f"token has no kid and issuer {name} has {len(keys.keys)} keys")
            raise _invalid(f"unknown key id {_clip(kid)} for issuer {name}")
        return key

    def _refresh_if_stale(self, st: _IssuerState) -> None:
        """Past the TTL, refetch in the background; the current keys serve meanwhile."""
        if not st.remote or st.keys is None:
            return
        now = time.monotonic()
        ttl = st.cfg.jwks_ttl_s
        if now - st.fetched_at >= ttl and now - st.last_attempt >= min(ttl, UNKNOWN_KID_REFETCH_S):
            self._start_refresh(st)

    def _start_refresh(self, st: _IssuerState) -> asyncio.Task[None]:
        if st.inflight is None or st.inflight.done():
            st.inflight = asyncio.create_task(self._refresh(st), name=f"jwks-refresh {st.cfg.issuer}")
        return st.inflight

    async def _refresh(self, st: _IssuerState) -> None:
        """Fetch the issuer's keys; on failure keep the last good set and remember why."""
        st.last_attempt = time.monotonic()
        try:
            keyset = await self._fetch_keys(st)
        except Exception as exc:
            st.last_error = str(exc)
            st.jwks_uri = None
            kept = "keeping the previous keys" if st.keys else "its tokens are refused until a fetch succeeds"
            log.warning(
                "identity: cannot load keys of issuer %s: %s (%s)",
                st.cfg.issuer,
                exc,
                kept,
                exc_info=not isinstance(exc, _FetchError),
            )
            return
        st.fetched_at = st.last_attempt
        st.last_error = None
        self._install(st, keyset)

    def _install(self, st: _IssuerState, keyset: _KeySet) -> None:
        if st.keys is not None and st.keys.fingerprint == keyset.fingerprint:
            return
        if st.keys is not None:
            log.info("identity: keys of issuer %s changed; verified-token cache cleared", st.cfg.issuer)
        st.keys = keyset
        self._cache.clear()

    async def _fetch_keys(self, st: _IssuerState) -> _KeySet:
        if st.cfg.jwks_url is not None:
            url = st.cfg.jwks_url
        elif st.jwks_uri is not None:
            url = st.jwks_uri
        else:
            discovery = st.cfg.issuer.rstrip("/") + "/.well-known/openid-configuration"
            meta = await self._fetch_json(discovery)
            if not isinstance(meta, dict) or not isinstance(meta.get("jwks_uri"), str):
                raise _FetchError(f"{discovery} has no jwks_uri")
            if meta.get("issuer") != st.cfg.issuer:
                raise _FetchError(
                    f"{discovery} names issuer {_clip(meta.get('issuer'))}, not {st.cfg.issuer}"
                )
            url = st.jwks_uri = meta["jwks_uri"]
        document = await self._fetch_json(url)
        try:
            return _keyset_from_jwks(document, url)
        except ValueError as exc:
            raise _FetchError(str(exc)) from exc

    async def _fetch_json(self, url: str) -> Any:
        assert self._client is not None, "start() was not called"
        try:
            async with self._client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise _FetchError(f"{url} answered HTTP {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_KEY_DOCUMENT_BYTES:
                        raise _FetchError(f"{url} answered more than {MAX_KEY_DOCUMENT_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise _FetchError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from exc
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _FetchError(f"{url} did not answer JSON") from exc

    def _delegated(self, delegations: Delegations, token: str) -> Principal:
        """The principal a delegation token names: the user as first verified, now acted for by
        the chain in `act` (checked for depth and cycles like any token's)."""
        try:
            claims = delegations.verify(token)
        except jwt.PyJWTError as exc:
            raise _invalid(f"delegation token refused: {_describe(exc)}") from None
        who = claims["bastion"]
        issuer, sub = who.get("issuer"), claims["sub"]
        if not isinstance(issuer, str) or not isinstance(sub, str) or not sub:
            raise _invalid("malformed delegation token")
        chain, scopes = _delegation(claims, self._cfg.max_delegation_depth)
        return Principal(
            sub=sub,
            issuer=issuer,
            groups=_strings(who.get("groups"), "groups"),
            roles=_strings(who.get("roles"), "roles"),
            tenant=_optional_str(who, "tenant"),
            email=_optional_str(who, "email"),
            agent=chain[0] if chain else None,
            delegation_chain=chain,
            scopes=scopes,
            claims=MappingProxyType(claims),
            id=self.identities.id_of(issuer, sub),
        )

    def _principal(self, issuer: str, claims: dict[str, Any]) -> Principal:
        names = self._cfg.claims
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise _invalid("sub claim must be a non-empty string")
        agent = claims.get("azp", claims.get("client_id"))
        if agent is not None and not isinstance(agent, str):
            raise _invalid("azp/client_id claim must be a string")
        chain, scopes = _delegation(claims, self._cfg.max_delegation_depth)
        return Principal(
            sub=sub,
            issuer=issuer,
            groups=_strings(_claim(claims, names.groups), names.groups),
            roles=_strings(_claim(claims, names.roles), names.roles),
            tenant=_optional_str(claims, names.tenant),
            email=_optional_str(claims, names.email),
            agent=agent,
            delegation_chain=chain,
            scopes=scopes,
            claims=MappingProxyType(claims),
            id=self.identities.id_of(issuer, sub),
        )


def _quote(text: str) -> str:
    """A header quoted-string body: printable ASCII only, with quotes and backslashes escaped."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in text)
    return safe.replace("\\", "\\\\").replace('"', '\\"')


def _describe(exc: jwt.PyJWTError) -> str:
    """A short, specific reason for a PyJWT failure (never the token's content)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "token not yet valid (iat in the future)" if "iat" in str(exc) else "token not yet valid (nbf)"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "audience not accepted"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "issuer not accepted"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token has no {exc.claim} claim"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "signature verification failed"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "iat claim must be a number"
    if isinstance(exc, InvalidSubjectError):
        return "sub claim must be a string"
    if isinstance(exc, jwt.InvalidKeyError):
        return "the issuer's key cannot verify this token"
    if isinstance(exc, jwt.DecodeError):
        return f"malformed token: {_clip(str(exc))}"
    return "invalid token"
