"""Identity end to end: a real local identity provider, a real Bastion, a real MCP upstream.

The identity provider is a small Starlette app serving OIDC discovery, a JWKS it can rotate or
stop serving, and an OAuth token endpoint (client credentials) that Bastion uses for its own
credential toward one upstream. Every refused tools/call must leave an audit record.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import POLICIES, free_port, running, running_gateway
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.cli import main as cli_main
from gateway.config import OAuthClientConfig
from gateway.demo import demo_server
from gateway.errors import ConfigError, UpstreamError
from gateway.identity.apikeys import new_key
from gateway.identity.devkeys import SigningKey, generate_key
from gateway.upstreams.credentials import ClientCredentials, upstream_auth

ES = generate_key("ES256", kid="idp-es-1")
RS = generate_key("RS256", kid="idp-rs-1")
ROTATED = generate_key("ES256", kid="idp-es-2")
ATTACKER = generate_key("ES256", kid="attacker")
CLIENT_ID = "bastion-gw"
CLIENT_SECRET = "s3cret:with/odd+chars"
API_KEY, API_PREFIX, API_SHA = new_key()
TOOLS = {"delete_note": {"risk": "write"}, "transfer": {"risk": "external"}}


@dataclass
class LocalIdP:
    """Discovery + JWKS + a client-credentials token endpoint, all switchable by the test."""

    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    down: bool = False
    hits: dict[str, int] = field(default_factory=dict)
    token_ttl: int = 3600
    issued: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)

    def app(self) -> Starlette:
        def seen(request: Request) -> Response | None:
            self.hits[request.url.path] = self.hits.get(request.url.path, 0) + 1
            return Response("down", 503) if self.down else None

        async def discovery(request: Request) -> Response:
            return seen(request) or JSONResponse({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})

        async def jwks(request: Request) -> Response:
            return seen(request) or JSONResponse({"keys": [dict(k.public_jwk) for k in self.keys]})

        async def token(request: Request) -> Response:
            seen(request)
            form = await request.form()
            scheme, _, creds = request.headers.get("authorization", "").partition(" ")
            expected = base64.b64encode(b"bastion-gw:s3cret%3Awith%2Fodd%2Bchars").decode()
            if scheme != "Basic" or creds != expected:
                return JSONResponse({"error": "invalid_client", "error_description": "no"}, 401)
            if form.get("grant_type") != "client_credentials" or form.get("scope") != "tools.call":
                return JSONResponse({"error": "invalid_request"}, 400)
            access = f"at-{len(self.issued) + 1}"
            self.issued.append(access)
            self.valid.add(access)
            return JSONResponse(
                {"access_token": access, "token_type": "Bearer", "expires_in": self.token_ttl}
            )

        async def elsewhere(request: Request) -> Response:
            seen(request)
            return JSONResponse({"keys": [dict(ATTACKER.public_jwk)]})

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
                Route("/token", token, methods=["POST"]),
                Route("/attacker/jwks", elsewhere),
            ]
        )


class Recorder:
    """An MCP upstream that records every request's headers and accepts only live IdP tokens."""

    def __init__(self, app: ASGIApp, idp: LocalIdP | None) -> None:
        self.app = app
        self.idp = idp
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hdrs = {k.decode(): v.decode() for k, v in scope["headers"]}
            self.headers.append(hdrs)
            token = hdrs.get("authorization", "").removeprefix("Bearer ")
            if self.idp is not None and token not in self.idp.valid:
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


@dataclass
class Env:
    base: str
    gw: Gateway
    idp: LocalIdP
    flaky: LocalIdP
    rotating: LocalIdP
    recorder: Recorder
    http: httpx.AsyncClient
    state_url: str

    def mint(
        self,
        key: SigningKey = ES,
        upstream: str = "demo",
        idp: LocalIdP | None = None,
        _headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": (idp or self.idp).url,
            "sub": "alice",
            "aud": f"{self.base}/mcp/{upstream}",
            "iat": now,
            "exp": now + 600,
            "groups": ["developers"],
        }
        body.update(claims)
        headers = {"kid": key.kid, **(_headers or {})}
        return jwt.encode(body, key.private_pem, algorithm=key.alg, headers=headers)

    async def call(
        self,
        token: str | None,
        tool: str = "echo",
        args: dict[str, Any] | None = None,
        upstream: str = "demo",
    ) -> httpx.Response:
        meta = {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": tool, "arguments": args or {"text": "hi"}, "_meta": meta},
        }
        hdrs = {
            "accept": "application/json, text/event-stream",
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/call",
            "mcp-name": tool,
        }
        if token is not None:
            hdrs["authorization"] = f"Bearer {token}"
        return await self.http.post(f"{self.base}/mcp/{upstream}", json=body, headers=hdrs)

    async def last_audit(self) -> dict[str, Any]:
        assert self.gw.store is not None
        rows = [r.to_json() async for r in self.gw.store.iter_records()]
        return rows[-1]

    async def audit_count(self) -> int:
        assert self.gw.store is not None
        return len([r async for r in self.gw.store.iter_records()])


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("identity-e2e")
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "identity.cedar").write_text(
        '@id("developers-use-test-upstreams")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"],'
        ' resource in Upstream::"scoped");\n'
        '@id("developers-use-oauthed")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"],'
        ' resource in Upstream::"oauthed");\n'
        '@id("add-needs-math-scope")\n@reason("add needs the math scope")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"demo/add")\n'
        'unless { context.agent.scopes.contains("math") };\n'
    )
    secret_file = tmp / "client-secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    idp, flaky, rotating = LocalIdP(keys=[ES, RS]), LocalIdP(keys=[ES]), LocalIdP(keys=[ES])
    recorder = Recorder(demo_server().streamable_http_app(streamable_http_path="/mcp"), idp)

    class Lifespanned:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await (recorder.app if scope["type"] == "lifespan" else recorder)(scope, receive, send)

    async with (
        running(idp.app()) as idp_url,
        running(flaky.app()) as flaky_url,
        running(rotating.app()) as rotating_url,
        running(demo_server().streamable_http_app(streamable_http_path="/mcp"), lifespan="on") as up_url,
        running(Lifespanned(), lifespan="on") as rec_url,
    ):
        idp.url, flaky.url, rotating.url = idp_url, flaky_url, rotating_url
        state_url = f"sqlite+aiosqlite:///{tmp / 'state.db'}"
        data: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "policy": {"dir": str(policies)},
            "audit": {"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"},
            "data_dir": str(tmp),
            "identity": {
                "issuers": [
                    {"issuer": idp_url, "discovery": True, "algorithms": ["ES256", "RS256"]},
                    {"issuer": rotating_url, "discovery": True},
                    {
                        "issuer": flaky_url,
                        "jwks_url": f"{flaky_url}/jwks",
                        "jwks_ttl_s": 0.2,
                        "jwks_stale_s": 1.0,
                    },
                ],
                "max_delegation_depth": 2,
                "scopes_supported": ["tools.read"],
                "api_keys": [
                    {"prefix": API_PREFIX, "sha256": API_SHA, "sub": "svc-report", "groups": ["developers"]}
                ],
            },
            "upstreams": {
                "demo": {"url": f"{up_url}/mcp", "tools": TOOLS},
                "scoped": {"url": f"{up_url}/mcp", "tools": TOOLS, "required_scopes": ["notes:write"]},
                "oauthed": {
                    "url": f"{rec_url}/mcp",
                    "oauth": {
                        "token_url": f"{idp_url}/token",
                        "client_id": CLIENT_ID,
                        "client_secret_file": str(secret_file),
                        "scope": "tools.call",
                    },
                },
            },
            "state": {"url": state_url},
        }
        cfg = config_mod.parse(data, tmp)
        async with running_gateway(cfg) as (base, gw), httpx.AsyncClient(timeout=10) as http:
            yield Env(base, gw, idp, flaky, rotating, recorder, http, state_url)


@pytest.fixture
def e(env: Env) -> Env:
    env.idp.keys, env.idp.down = [ES, RS], False
    env.flaky.keys, env.flaky.down = [ES], False
    return env


def result_of(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()["result"]
    return out


async def refused(e: Env, token: str | None, reason: str, upstream: str = "demo") -> dict[str, Any]:
    """Assert a 401 with the RFC 9728 challenge and an audit record of the refusal; return it."""
    before = await e.audit_count()
    r = await e.call(token, upstream=upstream)
    assert r.status_code == 401, r.text
    challenge = r.headers["www-authenticate"]
    assert f'resource_metadata="{e.base}/.well-known/oauth-protected-resource/mcp/{upstream}"' in challenge
    assert reason in r.json()["error"]["message"]
    assert await e.audit_count() == before + 1
    row = await e.last_audit()
    assert row["decision"]["stage"] == "identity" and row["decision"]["effect"] == "deny"
    assert reason in row["decision"]["reasons"][0]["reason"]
    assert row["outcome"]["status"] == "denied"
    return row


# --- issuers: discovery, rotation, stale window ------------------------------------------------


async def test_discovered_issuer_token_calls_a_tool(e: Env) -> None:
    assert result_of(await e.call(e.mint()))["content"][0]["text"] == "hi"
    assert e.idp.hits.get("/.well-known/openid-configuration", 0) >= 1


async def test_key_rotation_picked_up_without_restart(e: Env) -> None:
    rot = e.rotating
    old = e.mint(ES, idp=rot)
    assert result_of(await e.call(old))
    fetches = rot.hits["/jwks"]
    rot.keys = [ROTATED]
    assert result_of(await e.call(e.mint(ROTATED, idp=rot)))["content"][0]["text"] == "hi"
    assert rot.hits["/jwks"] == fetches + 1, "the unknown kid triggered exactly one refetch"
    await refused(e, old, "unknown key id idp-es-1")
    assert rot.hits["/jwks"] == fetches + 1, "refetches for unknown kids are rate-limited"


async def test_idp_down_inside_then_past_the_stale_window(e: Env) -> None:
    token = e.mint(ES, idp=e.flaky)
    assert result_of(await e.call(token))
    await asyncio.sleep(0.25)
    assert result_of(await e.call(token))  # past the TTL: a background refresh succeeds
    await asyncio.sleep(0.05)
    e.flaky.down = True
    down_at = time.monotonic()
    await asyncio.sleep(0.3)
    assert result_of(await e.call(token)), "inside the stale window the last good keys serve"
    assert result_of(await e.call(e.mint(ES, idp=e.flaky)))
    await asyncio.sleep(1.35 - (time.monotonic() - down_at))
    row = await refused(e, token, f"signing keys of issuer {e.flaky.url} are stale")
    assert row["user"] is None
    e.flaky.down = False
    await asyncio.sleep(0.25)
    assert result_of(await e.call(token)), "keys recover once the identity provider answers again"


# --- hardened verification: each attack refused with 401 and audited -------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(e: Env, header: dict[str, Any], claims: dict[str, Any] | None = None) -> str:
    now = int(time.time())
    body = {"iss": e.idp.url, "sub": "alice", "aud": f"{e.base}/mcp/demo", "exp": now + 600, "iat": now}
    body.update(claims or {})
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}."


async def test_alg_none_refused(e: Env) -> None:
    await refused(e, _unsigned(e, {"alg": "none", "kid": ES.kid}), "algorithm none not allowed")


async def test_hs256_signed_with_the_rsa_public_key_refused(e: Env) -> None:
    import hashlib
    import hmac as hmac_mod

    header = _b64(json.dumps({"alg": "HS256", "kid": RS.kid, "typ": "JWT"}).encode())
    payload = _unsigned(e, {}).split(".")[1]
    sig = hmac_mod.new(RS.public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    await refused(e, f"{header}.{payload}.{_b64(sig)}", "algorithm HS256 not allowed")


@pytest.mark.parametrize(
    "kid",
    [
        "../../../../etc/passwd",
        "http://127.0.0.1:1/attacker/jwks",
        "file:///dev/null",
        "idp-es-1/../attacker",
    ],
)
async def test_kid_with_path_or_url_tricks_is_only_a_name(e: Env, kid: str) -> None:
    fake = SigningKey(kid, ATTACKER.private_pem, "ES256", ATTACKER.public_jwk)
    await refused(e, e.mint(fake), "unknown key id")
    assert "/attacker/jwks" not in e.idp.hits


async def test_kid_that_is_not_a_plausible_key_id_refused_without_fetching(e: Env) -> None:
    fetches = e.idp.hits.get("/jwks", 0)
    fake = SigningKey("x" * 300, ATTACKER.private_pem, "ES256", ATTACKER.public_jwk)
    await refused(e, e.mint(fake), "kid header is not a plausible key id")
    assert e.idp.hits.get("/jwks", 0) == fetches


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk"])
async def test_key_location_headers_ignored(e: Env, header: str) -> None:
    value: Any = dict(ATTACKER.public_jwk) if header == "jwk" else f"{e.idp.url}/attacker/jwks"
    fake = SigningKey(ES.kid, ATTACKER.private_pem, "ES256", ATTACKER.public_jwk)
    await refused(e, e.mint(fake, _headers={header: value}), "signature verification failed")
    assert "/attacker/jwks" not in e.idp.hits


async def test_crit_header_refused(e: Env) -> None:
    await refused(e, e.mint(ES, _headers={"crit": ["exp"]}), "critical header parameters")


async def test_oversized_token_refused_before_parsing(e: Env) -> None:
    await refused(e, "a" * 20_000, "token larger than 16384 bytes")


@pytest.mark.parametrize(
    ("claim", "offset", "reason"),
    [
        ("exp", -120, "token expired"),
        ("nbf", 120, "token not yet valid (nbf)"),
        ("iat", 120, "token not yet valid (iat in the future)"),
    ],
)
async def test_time_claims_checked_with_leeway(e: Env, claim: str, offset: int, reason: str) -> None:
    now = int(time.time())
    outside: dict[str, Any] = {claim: now + offset}
    inside: dict[str, Any] = {claim: now + (offset + 100 if offset < 0 else offset - 100)}
    await refused(e, e.mint(ES, **outside), reason)
    assert result_of(await e.call(e.mint(ES, **inside))), "within leeway_s (30 s) it passes"


async def test_token_for_another_resource_refused(e: Env) -> None:
    await refused(e, e.mint(ES, aud="https://other.example/mcp"), "audience not accepted")


async def test_token_for_another_upstream_refused(e: Env) -> None:
    await refused(e, e.mint(ES, upstream="scoped"), f"not meant for {e.base}/mcp/demo")
    gateway_wide = e.mint(ES, aud=e.base)
    assert result_of(await e.call(gateway_wide)), (
        "a token for the whole gateway is accepted on every upstream"
    )


# --- delegation --------------------------------------------------------------------------------


async def test_delegation_chain_reaches_audit(e: Env) -> None:
    act = {"sub": "sub-agent", "act": {"sub": "orchestrator"}}
    assert result_of(await e.call(e.mint(ES, act=act)))
    row = await e.last_audit()
    assert row["user"] == "alice" and row["delegation_chain"] == ["sub-agent", "orchestrator"]


async def test_delegation_deeper_than_max_refused(e: Env) -> None:
    act = {"sub": "a3", "act": {"sub": "a2", "act": {"sub": "a1"}}}
    await refused(e, e.mint(ES, act=act), "delegation chain longer than identity.max_delegation_depth (2)")


@pytest.mark.parametrize(
    "act",
    [{"sub": "agent", "act": {"sub": "agent"}}, {"sub": "alice"}],
    ids=["actor-twice", "subject-as-actor"],
)
async def test_delegation_cycle_refused(e: Env, act: dict[str, Any]) -> None:
    await refused(e, e.mint(ES, act=act), "delegation cycle")


async def test_scopes_intersect_along_the_chain(e: Env) -> None:
    direct = e.mint(ES, scope="math notes")
    assert result_of(await e.call(direct, "add", {"a": 1, "b": 2}))["isError"] is False
    delegated = e.mint(ES, scope="math notes", act={"sub": "agent-7", "scope": "notes"})
    denied = result_of(await e.call(delegated, "add", {"a": 1, "b": 2}))
    assert denied["isError"] is True
    assert denied["structuredContent"]["reasons"] == [
        {"policy": "add-needs-math-scope", "reason": "add needs the math scope"}
    ]
    widened = e.mint(ES, scope="notes", act={"sub": "agent-7", "scp": ["math", "notes"]})
    assert result_of(await e.call(widened, "add", {"a": 1, "b": 2}))["isError"] is True, (
        "an actor's own scope never adds to what the token grants"
    )


# --- MCP authorization: metadata and insufficient_scope ----------------------------------------


async def test_resource_metadata_lists_scopes(e: Env) -> None:
    doc = (await e.http.get(f"{e.base}/.well-known/oauth-protected-resource/mcp/scoped")).json()
    assert doc["resource"] == f"{e.base}/mcp/scoped"
    assert doc["authorization_servers"] == [e.idp.url, e.rotating.url, e.flaky.url]
    assert doc["scopes_supported"] == ["notes:write", "tools.read"]
    assert doc["bearer_methods_supported"] == ["header"]
    demo = (await e.http.get(f"{e.base}/.well-known/oauth-protected-resource/mcp/demo")).json()
    assert demo["scopes_supported"] == ["tools.read"]


async def test_missing_required_scope_gets_403_insufficient_scope(e: Env) -> None:
    before = await e.audit_count()
    r = await e.call(e.mint(ES, upstream="scoped", scope="notes:read"), upstream="scoped")
    assert r.status_code == 403
    challenge = r.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="notes:write"' in challenge
    assert f'resource_metadata="{e.base}/.well-known/oauth-protected-resource/mcp/scoped"' in challenge
    assert await e.audit_count() == before + 1
    row = await e.last_audit()
    assert row["user"] == "alice" and row["decision"]["policy_ids"] == ["insufficient_scope"]
    ok = await e.call(e.mint(ES, upstream="scoped", scope="notes:read notes:write"), upstream="scoped")
    assert result_of(ok)["content"][0]["text"] == "hi"


# --- API keys ----------------------------------------------------------------------------------


async def test_api_key_from_config(e: Env) -> None:
    assert result_of(await e.call(API_KEY))["content"][0]["text"] == "hi"
    row = await e.last_audit()
    assert row["user"] == "bastion:api-key#svc-report" and row["agent"] == f"api-key:{API_PREFIX}"
    assert API_KEY not in json.dumps(row)


async def test_api_key_with_wrong_secret_refused(e: Env) -> None:
    forged = API_KEY[:-4] + ("AAAA" if not API_KEY.endswith("AAAA") else "BBBB")
    await refused(e, forged, "unknown API key")
    await refused(e, f"bst_{API_PREFIX}", "malformed API key")


async def test_api_key_from_state_db_and_revocation(
    e: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file = tmp_path / "bastion.yaml"
    cfg_file.write_text(json.dumps({"state": {"url": e.state_url}}))
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("bastion")),
        *["keys", "create", "--sub", "svc-etl", "--group", "developers", "--scope", "notes"],
        *["--config", str(cfg_file)],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    key = out.decode().strip()
    assert proc.returncode == 0 and key.startswith("bst_")
    assert result_of(await e.call(key))["content"][0]["text"] == "hi"
    assert (await e.last_audit())["user"] == "bastion:api-key#svc-etl"

    async def cli(*args: str) -> tuple[int, str]:
        code = await asyncio.to_thread(cli_main, ["keys", *args, "--config", str(cfg_file)])
        return code, capsys.readouterr().out

    code, listing = await cli("list")
    prefix = key.split("_")[1]
    assert code == 0 and prefix in listing and "svc-etl" in listing and key not in listing
    code, key2 = await cli("create", "--sub", "svc-old", "--group", "developers")
    prefix2 = key2.strip().split("_")[1]
    assert (await cli("revoke", prefix2))[0] == 0
    await refused(e, key2.strip(), f"API key {prefix2} was revoked")
    assert (await cli("revoke", "nosuchkey0"))[0] == 1
    assert prefix2 not in (await cli("list"))[1]
    assert prefix2 in (await cli("list", "--all"))[1]


# --- Bastion's own upstream credential (OAuth client credentials) ------------------------------


async def test_oauth_upstream_sees_bastions_token_never_the_clients(e: Env) -> None:
    e.idp.token_ttl = 3600
    client_token = e.mint(ES, upstream="oauthed")
    seen_before = len(e.recorder.headers)
    for _ in range(3):
        assert result_of(await e.call(client_token, upstream="oauthed"))["content"][0]["text"] == "hi"
    seen = e.recorder.headers[seen_before:]
    assert seen
    current = e.idp.issued[-1]
    for hdrs in seen:
        assert hdrs["authorization"] == f"Bearer {current}"
        assert client_token not in json.dumps(hdrs)
    assert len(e.idp.issued) <= 2, "the token is cached, not fetched per call"


async def test_oauth_token_refreshed_before_expiry_and_after_revocation(e: Env) -> None:
    client_token = e.mint(ES, upstream="oauthed")
    e.idp.token_ttl = 1
    e.idp.valid.clear()  # the upstream now refuses Bastion's cached token: one retry with a fresh one
    assert result_of(await e.call(client_token, upstream="oauthed"))
    issued = len(e.idp.issued)
    assert e.recorder.headers[-1]["authorization"] == f"Bearer {e.idp.issued[-1]}"
    assert result_of(await e.call(client_token, upstream="oauthed"))
    assert len(e.idp.issued) == issued, "still fresh: no new token"
    await asyncio.sleep(0.95)  # 1 s token, refreshed 0.1 s before it expires
    assert result_of(await e.call(client_token, upstream="oauthed"))
    assert len(e.idp.issued) == issued + 1
    assert e.recorder.headers[-1]["authorization"] == f"Bearer {e.idp.issued[-1]}"
    e.idp.token_ttl = 3600


async def test_token_endpoint_refusal_is_an_upstream_error(e: Env) -> None:
    bad = OAuthClientConfig(
        token_url=f"{e.idp.url}/token", client_id=CLIENT_ID, client_secret="wrong", scope="tools.call"
    )
    async with httpx.AsyncClient(auth=ClientCredentials("notes", bad)) as client:
        with pytest.raises(UpstreamError, match=r"answered HTTP 401 \(invalid_client\)"):
            await client.get(f"{e.base}/healthz")


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        (
            {
                "headers": {"Authorization": "Bearer x"},
                "oauth": {"token_url": "u", "client_id": "c", "client_secret": "s"},
            },
            "oauth excludes a static Authorization",
        ),
        (
            {"oauth": {"token_url": "u", "client_id": "c"}},
            "set exactly one of client_secret, client_secret_file",
        ),
        (
            {"bearer_token_file": "t", "headers": {"authorization": "x"}},
            "bearer_token_file and headers.Authorization",
        ),
    ],
)
def test_upstream_credential_config_errors(tmp_path: Path, upstream: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        config_mod.parse({"upstreams": {"notes": {"url": "http://127.0.0.1:1/mcp", **upstream}}}, tmp_path)
    assert "upstreams.notes" in info.value.message


def test_missing_bearer_token_file_stops_start_up(tmp_path: Path) -> None:
    cfg = config_mod.parse(
        {"upstreams": {"notes": {"url": "http://127.0.0.1:1/mcp", "bearer_token_file": "nope.txt"}}}, tmp_path
    )
    with pytest.raises(ConfigError, match=r"upstreams\.notes\.bearer_token_file: cannot read .*nope\.txt"):
        Gateway(cfg)


async def test_bearer_token_file_becomes_the_upstream_authorization(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("from-a-file\n")
    cfg = config_mod.parse(
        {"upstreams": {"notes": {"url": "http://127.0.0.1:1/mcp", "bearer_token_file": "tok"}}}, tmp_path
    )
    headers, auth = upstream_auth("notes", cfg.upstreams["notes"])
    assert headers == {"Authorization": "Bearer from-a-file"} and auth is None


def test_api_key_config_entry_is_validated(tmp_path: Path) -> None:
    entry = {"prefix": "ABC", "sha256": "00", "sub": "svc"}
    with pytest.raises(ConfigError, match=r"identity\.api_keys\.0\.prefix") as info:
        config_mod.parse({"identity": {"api_keys": [entry]}}, tmp_path)
    assert "identity.api_keys.0.sha256" in info.value.message
