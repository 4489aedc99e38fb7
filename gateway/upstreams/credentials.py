"""Bastion's own credential toward an upstream: a static bearer token, or OAuth 2.0 client credentials.

The caller's token never travels further than Bastion. Each upstream gets the credential
configured for it: `headers` (with `${ENV}`), `bearer_token_file` (read at start-up), or
`oauth` (RFC 6749 §4.4 client credentials), where `ClientCredentials` gets a token from the
token endpoint, caches it and fetches a new one shortly before it expires. The token request
travels through the upstream's own pooled client as part of the auth flow, so it needs no
client of its own. A token endpoint that fails makes the call fail as an `UpstreamError`.

Nor does anything travel back: upstream clients keep no cookies (`NoCookies`). They are shared by
every caller, so a jar would send a cookie set in answer to one user's call on the next user's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Generator
from http.cookiejar import CookieJar
from pathlib import Path
from urllib.parse import quote_plus

import httpx

from gateway.config import LLMCredential, OAuthClientConfig, UpstreamConfig
from gateway.errors import ConfigError, UpstreamError
from gateway.upstreams.transport import header_value_ok

log = logging.getLogger("bastion.upstream")


class NoCookies(CookieJar):
    """A cookie jar that keeps nothing and adds nothing (for clients shared by every caller)."""

    def extract_cookies(self, response: object, request: object) -> None:
        return None

    def add_cookie_header(self, request: object) -> None:
        return None


DEFAULT_EXPIRES_S = 300.0
"""Lifetime assumed when a token response has no `expires_in`."""
REFRESH_MARGIN_S = 60.0
"""Fetch a new token this long before the old one expires (less for short-lived tokens)."""
MAX_TOKEN_RESPONSE = 64 * 1024


def _read_secret(path: Path, key: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"{key}: {path} is empty")
    return value


def upstream_auth(name: str, cfg: UpstreamConfig) -> tuple[dict[str, str], httpx.Auth | None]:
    """The default headers and the `httpx.Auth` an upstream's client is built with."""
    headers = dict(cfg.headers)
    if cfg.bearer_token_file is not None:
        token = _read_secret(cfg.bearer_token_file, f"upstreams.{name}.bearer_token_file")
        headers["Authorization"] = f"Bearer {token}"
    if cfg.oauth is not None:
        return headers, ClientCredentials(name, cfg.oauth)
    return headers, None


class ClientCredentials(httpx.Auth):
    """OAuth 2.0 client credentials as an `httpx.Auth`: one cached token, refreshed before expiry.

    Concurrent requests share one token fetch (a lock). An upstream that answers 401 gets one
    retry with a fresh token, in case the token was revoked before its `exp`.
    """

    def __init__(self, upstream: str, cfg: OAuthClientConfig) -> None:
        self.upstream = upstream
        self.cfg = cfg
        if cfg.client_secret_file is not None:
            key = f"upstreams.{upstream}.oauth.client_secret_file"
            self._secret = _read_secret(cfg.client_secret_file, key)
        else:
            assert cfg.client_secret is not None
            self._secret = cfg.client_secret
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("ClientCredentials works with httpx.AsyncClient only")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = self._token
        if token is None or time.monotonic() >= self._refresh_at:
            async with self._lock:
                if self._token is None or time.monotonic() >= self._refresh_at:
                    await self._store((yield self._token_request()))
                token = self._token
        assert token is not None
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        async with self._lock:
            if self._token == token:
                await self._store((yield self._token_request()))
            token = self._token
        assert token is not None
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

    def _token_request(self) -> httpx.Request:
        form = {"grant_type": "client_credentials"}
        if self.cfg.scope:
            form["scope"] = self.cfg.scope
        if self.cfg.resource:
            form["resource"] = self.cfg.resource
        headers = {"Accept": "application/json"}
        if self.cfg.auth_method == "client_secret_post":
            form |= {"client_id": self.cfg.client_id, "client_secret": self._secret}
        else:
            # RFC 6749 §2.3.1: client id and secret are form-urlencoded before HTTP Basic.
            pair = f"{quote_plus(self.cfg.client_id)}:{quote_plus(self._secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        return httpx.Request("POST", self.cfg.token_url, data=form, headers=headers)

    async def _store(self, response: httpx.Response) -> None:
        started = time.monotonic()
        where = f"upstream {self.upstream}: token endpoint {self.cfg.token_url}"
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{where} failed: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise UpstreamError(f"{where} answered HTTP {response.status_code}{_oauth_error(body)}")
        try:
            if len(body) > MAX_TOKEN_RESPONSE:
                raise ValueError("too large")
            doc = json.loads(body)
            token = doc["access_token"]
            token_type = doc.get("token_type", "Bearer")
            expires = float(doc.get("expires_in", DEFAULT_EXPIRES_S))
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"{where} did not answer a token response") from exc
        if not isinstance(token, str) or not token or not isinstance(token_type, str):
            raise UpstreamError(f"{where} did not answer a token response")
        if token_type.lower() != "bearer":
            raise UpstreamError(f"{where} issued a {token_type[:20]!r} token; only Bearer is supported")
        margin = min(REFRESH_MARGIN_S, expires / 10)
        self._token = token
        self._refresh_at = started + max(expires - margin, 0.0)
        self.fetches += 1
        log.info("upstream %s: new access token, valid %.0f s", self.upstream, expires)


def _oauth_error(body: bytes) -> str:
    """The RFC 6749 `error` code of a failed token response, if there is one (never the description)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, str) and error.replace("_", "").isalnum():
        return f" ({error[:40]})"
    return ""


def static_credential(where: str, cred: LLMCredential | None) -> tuple[str, str] | None:
    """(header, value) read once at start-up; a missing key stops start-up naming where it was sought."""
    if cred is None:
        return None
    if cred.from_env is not None:
        key = os.environ.get(cred.from_env)
        if not key:
            raise ConfigError(f"{where}: environment variable {cred.from_env} is not set")
    else:
        assert cred.file is not None
        try:
            lines = cred.file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{where}.file: cannot read {cred.file}: {exc.strerror}") from exc
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"{where}.file: {cred.file} is empty")
    value = cred.prefix + key.strip()
    if not header_value_ok(value):
        raise ConfigError(f"{where}: the key holds characters a header cannot carry")
    return cred.header.lower(), value
