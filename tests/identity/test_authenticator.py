"""The identity stage against real keys: a JWKS file, a PEM file, and a JWKS served over loopback HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import stat
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.call import Principal
from gateway.config import IdentityConfig, IssuerConfig
from gateway.errors import AuthError, ConfigError
from gateway.identity.authenticator import Authenticator
from gateway.identity.devkeys import DEV_ISSUER, SigningKey, ensure_dev_key, generate_key

BASE = "http://127.0.0.1:8080"
ISS = "https://idp.test/realms/agents"
AUD = BASE

ES = generate_key("ES256", kid="es-1")
RS = generate_key("RS256", kid="rs-1")
ROTATED = generate_key("ES256", kid="es-2")
ATTACKER = generate_key("ES256", kid="es-1")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {"iss": ISS, "sub": "alice", "aud": AUD, "iat": now, "exp": now + 600}
    c.update(over)
    return c


def sign(key: SigningKey, payload: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(payload, key.private_pem, algorithm=key.alg, headers={"kid": key.kid, **headers})


def bearer(token: str) -> str:
    return f"Bearer {token}"


def write_jwks(tmp_path: Path, *keys: SigningKey) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [dict(k.public_jwk) for k in keys]}))
    return path


def identity(**issuer: Any) -> IdentityConfig:
    issuer.setdefault("issuer", ISS)
    return IdentityConfig(issuers=[IssuerConfig(**issuer)])


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[Authenticator]:
    a = Authenticator(identity(jwks_file=write_jwks(tmp_path, ES, RS)), BASE, ["notes", "files"])
    await a.start()
    yield a
    await a.aclose()


async def reason(a: Authenticator, header: str | None) -> AuthError:
    with pytest.raises(AuthError) as info:
        await a.authenticate(header)
    return info.value


# --- a loopback identity provider -------------------------------------------------------------


@dataclass
class IdP:
    url: str = ""
    keys: list[SigningKey] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)

    def reset(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.hits.clear()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
async def idp_server() -> AsyncIterator[IdP]:
    idp = IdP()

    def count(request: Request) -> None:
        idp.hits[request.url.path] = idp.hits.get(request.url.path, 0) + 1

    async def jwks(request: Request) -> Response:
        count(request)
        return JSONResponse({"keys": [dict(k.public_jwk) for k in idp.keys]})

    async def discovery(request: Request) -> Response:
        count(request)
        return JSONResponse({"issuer": idp.url, "jwks_uri": f"{idp.url}/keys"})

    async def attacker(request: Request) -> Response:
        count(request)
        return JSONResponse({"keys": [dict(ATTACKER.public_jwk)]})

    app = Starlette(
        routes=[
            Route("/jwks", jwks),
            Route("/keys", jwks),
            Route("/.well-known/openid-configuration", discovery),
            Route("/attacker/jwks", attacker),
        ]
    )
    sock = free_socket()
    idp.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", ws="none"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    yield idp
    server.should_exit = True
    await task
    sock.close()


@pytest.fixture
def idp(idp_server: IdP) -> IdP:
    idp_server.reset(ES)
    return idp_server


@pytest.fixture
async def remote(idp: IdP) -> AsyncIterator[Authenticator]:
    a = Authenticator(identity(issuer=idp.url, jwks_url=f"{idp.url}/jwks", algorithms=["ES256"]), BASE, [])
    await a.start()
    yield a
    await a.aclose()


def remote_claims(idp: IdP, **over: Any) -> dict[str, Any]:
    return claims(iss=idp.url, **over)


# --- valid tokens -----------------------------------------------------------------------------


async def test_valid_token_maps_claims_to_principal(auth: Authenticator) -> None:
    token = sign(
        ES,
        claims(
            groups=["eng", "oncall"],
            roles="reader, writer admin",
            tenant="acme",
            email="alice@acme.test",
            azp="cursor",
            act={"sub": "agent-7", "act": {"sub": "orchestrator"}},
        ),
    )
    p = await auth.authenticate(bearer(token))
    assert p == Principal(
        sub="alice",
        issuer=ISS,
        groups=frozenset({"eng", "oncall"}),
        roles=frozenset({"reader", "writer", "admin"}),
        tenant="acme",
        email="alice@acme.test",
        agent="cursor",
        delegation_chain=("agent-7", "orchestrator"),
    )
    assert p.claims["tenant"] == "acme"


async def test_rs256_and_client_id_as_agent(auth: Authenticator) -> None:
    p = await auth.authenticate(bearer(sign(RS, claims(client_id="svc-bot"))))
    assert (p.sub, p.agent, p.groups, p.delegation_chain) == ("alice", "svc-bot", frozenset(), ())


async def test_configured_claim_names_and_nested_claims(tmp_path: Path) -> None:
    cfg = IdentityConfig.model_validate(
        {
            "issuers": [{"issuer": ISS, "jwks_file": write_jwks(tmp_path, ES)}],
            "claims": {"groups": "https://acme.test/groups", "roles": "realm_access.roles", "tenant": "org"},
        }
    )
    a = Authenticator(cfg, BASE, [])
    await a.start()
    token = sign(
        ES, claims(**{"https://acme.test/groups": ["x"], "realm_access": {"roles": ["r1"]}, "org": "o1"})
    )
    p = await a.authenticate(bearer(token))
    assert (p.groups, p.roles, p.tenant) == (frozenset({"x"}), frozenset({"r1"}), "o1")
    await a.aclose()


async def test_malformed_group_claim_refused(auth: Authenticator) -> None:
    err = await reason(auth, bearer(sign(ES, claims(groups=[1, 2]))))
    assert err.message == "claim groups must be a list of strings or a space separated string"


async def test_malformed_act_claim_refused(auth: Authenticator) -> None:
    err = await reason(auth, bearer(sign(ES, claims(act={"act": {"sub": "x"}}))))
    assert "act claim" in err.message


async def test_public_key_pem_issuer(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(RS.public_pem())
    a = Authenticator(identity(public_key_file=pem, algorithms=["RS256"]), BASE, [])
    await a.start()
    token = jwt.encode(claims(), RS.private_pem, algorithm="RS256")
    assert (await a.authenticate(bearer(token))).sub == "alice"
    assert (await a.authenticate(bearer(sign(RS, claims(sub="bob"))))).sub == "bob"
    await a.aclose()


async def test_dev_key_round_trip(tmp_path: Path) -> None:
    dev = ensure_dev_key(tmp_path / "data")
    key_file = tmp_path / "data" / "dev-signing-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = ensure_dev_key(tmp_path / "data")
    assert (again.kid, again.private_pem) == (dev.kid, dev.private_pem)
    jwks = json.loads(dev.jwks_path.read_text())
    assert jwks["keys"][0]["kid"] == dev.kid and jwks["keys"][0]["alg"] == "ES256"
    assert jwks["keys"][0]["use"] == "sig" and "d" not in jwks["keys"][0]

    a = Authenticator(
        identity(issuer=DEV_ISSUER, jwks_file=dev.jwks_path, algorithms=["ES256"]), BASE, ["notes"]
    )
    await a.start()
    p = await a.authenticate(bearer(dev.mint("dev-user", audience=f"{BASE}/mcp/notes", groups=["admins"])))
    assert (p.sub, p.issuer, p.groups) == ("dev-user", DEV_ISSUER, frozenset({"admins"}))
    await a.aclose()


async def test_cached_verify_returns_same_principal(auth: Authenticator) -> None:
    token = bearer(sign(ES, claims(groups=["eng"])))
    first = await auth.authenticate(token)
    second = await auth.authenticate(token)
    assert second is first


# --- the request header -----------------------------------------------------------------------


async def test_missing_header(auth: Authenticator) -> None:
    for header in (None, "", "Bearer ", "Bearer"):
        err = await reason(auth, header)
        assert (err.message, err.error) == ("missing bearer token", "invalid_request"), header


async def test_non_bearer_scheme(auth: Authenticator) -> None:
    err = await reason(auth, "Basic YWxpY2U6c2VjcmV0")
    assert err.error == "invalid_request"
    assert err.message == "unsupported authorization scheme Basic; use Bearer"


async def test_oversized_token_refused_before_parsing(auth: Authenticator) -> None:
    err = await reason(auth, bearer("x" * 16385))
    assert err.message == "token larger than 16384 bytes"
    err = await reason(auth, "Bearer " + "a" * 10**6)
    assert err.message == "token larger than 16384 bytes"


async def test_garbage_token(auth: Authenticator) -> None:
    err = await reason(auth, bearer("not-a-jwt"))
    assert err.error == "invalid_token" and err.message.startswith("malformed token")


# --- time claims ------------------------------------------------------------------------------


async def test_expired(auth: Authenticator) -> None:
    err = await reason(auth, bearer(sign(ES, claims(exp=int(time.time()) - 120))))
    assert (err.message, err.error) == ("token expired", "invalid_token")


async def test_expired_within_leeway_accepted(auth: Authenticator) -> None:
    p = await auth.authenticate(bearer(sign(ES, claims(exp=int(time.time()) - 10))))
    assert p.sub == "alice"


async def test_missing_exp_refused(auth: Authenticator) -> None:
    payload = claims()
    del payload["exp"]
    err = await reason(auth, bearer(sign(ES, payload)))
    assert err.message == "token has no exp claim"


async def test_nbf_in_future(auth: Authenticator) -> None:
    err = await reason(auth, bearer(sign(ES, claims(nbf=int(time.time()) + 300))))
    assert err.message == "token not yet valid (nbf)"


# --- audience and issuer ----------------------------------------------------------------------


async def test_wrong_audience(auth: Authenticator) -> None:
    err = await reason(auth, bearer(sign(ES, claims(aud="https://other.example/mcp"))))
    assert err.message == "audience not accepted"


async def test_upstream_resource_audience_accepted(auth: Authenticator) -> None:
    p = await auth.authenticate(bearer(sign(ES, claims(aud=["https://other.example", f"{BASE}/mcp/files"]))))
    assert p.sub == "alice"
    err = await reason(auth, bearer(sign(ES, claims(aud=f"{BASE}/mcp/unknown"))))
    assert err.message == "audience not accepted"


async def test_configured_audiences_replace_defaults(tmp_path: Path) -> None:
    a = Authenticator(identity(jwks_file=write_jwks(tmp_path, ES), audiences=["api://bastion"]), BASE, [])
    await a.start()
    assert (await a.authenticate(bearer(sign(ES, claims(aud="api://bastion"))))).sub == "alice"
    assert (await reason(a, bearer(sign(ES, claims())))).message == "audience not accepted"
    await a.aclose()


async def test_wrong_issuer(auth: Authenticator) -> None:
    err = await reason(auth, bearer(sign(ES, claims(iss="https://evil.example/" + "x" * 500))))
    assert err.message.startswith("issuer https://evil.example/xxx")
    assert err.message.endswith("... is not trusted")
    assert len(err.message) < 130


# --- signatures and headers -------------------------------------------------------------------


async def test_forged_signature_same_kid(auth: Authenticator) -> None:
    err = await reason(auth, bearer(sign(ATTACKER, claims())))
    assert err.message == "signature verification failed"


async def test_tampered_payload(auth: Authenticator) -> None:
    header, _, sig = sign(ES, claims()).split(".")
    payload = b64(json.dumps(claims(sub="root")).encode())
    err = await reason(auth, bearer(f"{header}.{payload}.{sig}"))
    assert err.message == "signature verification failed"


async def test_alg_none_refused(auth: Authenticator) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": ES.kid}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    err = await reason(auth, bearer(token))
    assert err.message == f"algorithm none not allowed for issuer {ISS}"


async def test_hs256_with_public_key_as_secret_refused(auth: Authenticator) -> None:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": RS.kid}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(RS.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    err = await reason(auth, bearer(f"{signing_input}.{b64(mac)}"))
    assert err.message == f"algorithm HS256 not allowed for issuer {ISS}"


async def test_alg_must_match_key_type(auth: Authenticator) -> None:
    token = jwt.encode(claims(), RS.private_pem, algorithm="RS256", headers={"kid": ES.kid})
    err = await reason(auth, bearer(token))
    assert err.message == f"algorithm RS256 does not match the key es-1 of issuer {ISS}"


async def test_jku_and_jwk_headers_ignored(auth: Authenticator, idp: IdP) -> None:
    jku = f"{idp.url}/attacker/jwks"
    forged = sign(ATTACKER, claims(), jku=jku, jwk=dict(ATTACKER.public_jwk))
    err = await reason(auth, bearer(forged))
    assert err.message == "signature verification failed"
    legit = sign(ES, claims(), jku=jku)
    assert (await auth.authenticate(bearer(legit))).sub == "alice"
    assert idp.hits == {}


async def test_crit_header_refused(auth: Authenticator) -> None:
    err = await reason(auth, bearer(sign(ES, claims(), crit=["exp"], exp=1)))
    assert err.message == "critical header parameters (crit) are not supported"


async def test_token_without_kid(tmp_path: Path) -> None:
    a = Authenticator(identity(jwks_file=write_jwks(tmp_path, ES)), BASE, [])
    await a.start()
    token = jwt.encode(claims(), ES.private_pem, algorithm="ES256")
    assert (await a.authenticate(bearer(token))).sub == "alice"
    await a.aclose()


async def test_token_without_kid_refused_when_several_keys(auth: Authenticator) -> None:
    token = jwt.encode(claims(), ES.private_pem, algorithm="ES256")
    err = await reason(auth, bearer(token))
    assert err.message == f"token has no kid and issuer {ISS} has 2 keys"


# --- configuration errors ---------------------------------------------------------------------


async def test_missing_jwks_file_is_config_error(tmp_path: Path) -> None:
    a = Authenticator(identity(jwks_file=tmp_path / "nope.json"), BASE, [])
    with pytest.raises(ConfigError, match=r"issuer 'https://idp.test/realms/agents'.*nope\.json"):
        await a.start()
    await a.aclose()


async def test_bad_pem_is_config_error(tmp_path: Path) -> None:
    pem = tmp_path / "bad.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    a = Authenticator(identity(public_key_file=pem), BASE, [])
    with pytest.raises(ConfigError, match=r"issuer 'https://idp.test/realms/agents'.*bad\.pem"):
        await a.start()
    await a.aclose()


def test_duplicate_issuer_is_config_error(tmp_path: Path) -> None:
    issuer = IssuerConfig(issuer=ISS, jwks_file=tmp_path / "k.json")
    with pytest.raises(ConfigError, match="configured twice"):
        Authenticator(IdentityConfig(issuers=[issuer, issuer]), BASE, [])


# --- remote key sets --------------------------------------------------------------------------


async def test_jwks_url_issuer(remote: Authenticator, idp: IdP) -> None:
    p = await remote.authenticate(bearer(sign(ES, remote_claims(idp))))
    assert p.issuer == idp.url
    assert idp.hits == {"/jwks": 1}


async def test_discovery_issuer(idp: IdP) -> None:
    a = Authenticator(identity(issuer=idp.url, discovery=True), BASE, ["notes"])
    await a.start()
    p = await a.authenticate(bearer(sign(ES, remote_claims(idp, aud=f"{BASE}/mcp/notes"))))
    assert p.sub == "alice"
    assert idp.hits == {"/.well-known/openid-configuration": 1, "/keys": 1}
    await a.aclose()


async def test_unknown_kid_triggers_one_refetch(remote: Authenticator, idp: IdP) -> None:
    idp.keys.append(ROTATED)
    p = await remote.authenticate(bearer(sign(ROTATED, remote_claims(idp))))
    assert p.sub == "alice"
    assert idp.hits == {"/jwks": 2}


async def test_flood_of_unknown_kids_fetches_at_most_once(remote: Authenticator, idp: IdP) -> None:
    tokens = [
        bearer(sign(generate_key("ES256", kid=uuid.uuid4().hex), remote_claims(idp))) for _ in range(50)
    ]
    results = await asyncio.gather(*(remote.authenticate(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, AuthError) and r.message.startswith("unknown key id") for r in results)
    for t in tokens[:10]:
        await reason(remote, t)
    assert idp.hits == {"/jwks": 2}


async def test_key_rotation_clears_cache(remote: Authenticator, idp: IdP) -> None:
    old = bearer(sign(ES, remote_claims(idp)))
    await remote.authenticate(old)
    idp.reset(ROTATED)
    assert (await remote.authenticate(bearer(sign(ROTATED, remote_claims(idp))))).sub == "alice"
    err = await reason(remote, old)
    assert err.message == f"unknown key id es-1 for issuer {idp.url}"


async def test_keys_refetched_after_ttl(idp: IdP) -> None:
    a = Authenticator(identity(issuer=idp.url, jwks_url=f"{idp.url}/jwks", jwks_ttl_s=0.05), BASE, [])
    await a.start()
    await asyncio.sleep(0.06)
    await a.authenticate(bearer(sign(ES, remote_claims(idp))))
    for _ in range(100):
        if idp.hits["/jwks"] == 2:
            break
        await asyncio.sleep(0.01)
    assert idp.hits == {"/jwks": 2}
    await a.aclose()


async def test_unreachable_jwks_url_fails_closed() -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    iss = f"http://127.0.0.1:{port}"
    a = Authenticator(identity(issuer=iss, jwks_url=f"{iss}/jwks"), BASE, [])
    await a.start()
    err = await reason(a, bearer(sign(ES, claims(iss=iss))))
    assert err.http_status == 401 and err.error == "invalid_token"
    assert err.message == f"signing keys of issuer {iss} are unavailable (the key fetch failed)"
    await a.aclose()


async def test_last_good_keys_kept_when_idp_fails(idp: IdP) -> None:
    a = Authenticator(identity(issuer=idp.url, jwks_url=f"{idp.url}/jwks", jwks_ttl_s=0.05), BASE, [])
    await a.start()
    idp.keys = []
    await asyncio.sleep(0.06)
    token = bearer(sign(ES, remote_claims(idp)))
    assert (await a.authenticate(token)).sub == "alice"
    await asyncio.sleep(0.05)
    assert (await a.authenticate(token)).sub == "alice"
    assert idp.hits["/jwks"] >= 2
    await a.aclose()


# --- WWW-Authenticate -------------------------------------------------------------------------


def test_www_authenticate(tmp_path: Path) -> None:
    a = Authenticator(IdentityConfig(), BASE, [])
    url = f"{BASE}/.well-known/oauth-protected-resource/mcp/notes"
    assert a.www_authenticate(url, None) == f'Bearer resource_metadata="{url}"'
    err = AuthError('issuer "x\\y" is not trusted')
    assert a.www_authenticate(url, err) == (
        f'Bearer resource_metadata="{url}", error="invalid_token", '
        'error_description="issuer \\"x\\\\y\\" is not trusted"'
    )
    assert "\n" not in a.www_authenticate(url, AuthError("a\r\nSet-Cookie: x"))


async def test_removed_key_stops_cached_tokens_after_ttl(idp: IdP) -> None:
    a = Authenticator(identity(issuer=idp.url, jwks_url=f"{idp.url}/jwks", jwks_ttl_s=0.05), BASE, [])
    await a.start()
    old = bearer(sign(ES, remote_claims(idp)))
    await a.authenticate(old)
    idp.reset(ROTATED)
    await asyncio.sleep(0.06)
    await a.authenticate(old)
    for _ in range(100):
        if idp.hits.get("/jwks") == 1:
            break
        await asyncio.sleep(0.01)
    err = await reason(a, old)
    assert err.message == f"unknown key id es-1 for issuer {idp.url}"
    await a.aclose()


def test_empty_audiences_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"identity\.issuers\.0\.audiences: empty"):
        Authenticator(identity(jwks_file=tmp_path / "k.json", audiences=[]), BASE, [])


async def test_bearer_scheme_is_case_insensitive(auth: Authenticator) -> None:
    assert (await auth.authenticate("bearer\t" + sign(ES, claims()))).sub == "alice"
