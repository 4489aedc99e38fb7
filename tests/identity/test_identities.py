"""Users are named by issuer and subject together: the id rule, its config, and the Authenticator.

Two issuers may both have an "alice"; an API key may be created with any subject. Each of them
must be a user of its own (Cedar id, budgets, admin rights), except where `identity.same_identity`
merges issuers on purpose.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from gateway import config as config_mod
from gateway.call import API_KEY_ISSUER, Identities
from gateway.config import ApiKeyConfig, IdentityConfig, IssuerConfig
from gateway.errors import AuthError, ConfigError
from gateway.identity.apikeys import new_key
from gateway.identity.authenticator import Authenticator
from gateway.identity.devkeys import SigningKey, generate_key

BASE = "http://127.0.0.1:8080"
A, B, C = "https://idp-a.test", "https://idp-b.test", "https://idp-c.test"
KEY_A, KEY_B, KEY_C = (generate_key("ES256", kid=k) for k in ("a-1", "b-1", "c-1"))
API_KEY, API_PREFIX, API_SHA = new_key()


# --- the rule ----------------------------------------------------------------------------------


def test_one_issuer_keeps_bare_subjects_and_api_keys_are_qualified() -> None:
    ids = Identities((A,))
    assert ids.id_of(A, "alice") == "alice"
    assert ids.id_of(API_KEY_ISSUER, "alice") == "bastion:api-key#alice"


def test_every_issuer_but_the_first_is_qualified() -> None:
    ids = Identities((A, B))
    assert ids.id_of(A, "alice") == "alice"
    assert ids.id_of(B, "alice") == f"{B}#alice"
    assert ids.id_of(API_KEY_ISSUER, "alice") == "bastion:api-key#alice"


def test_api_keys_alone_are_the_first_issuer() -> None:
    assert Identities().id_of(API_KEY_ISSUER, "svc") == "svc"


def test_a_first_issuer_subject_that_reads_as_a_qualified_id_is_qualified() -> None:
    ids = Identities((A, B))
    assert ids.id_of(A, f"{B}#alice") == f"{A}#{B}#alice"
    assert ids.id_of(A, "team#blue") == "team#blue", "only a known issuer before '#' is ambiguous"


def test_ids_never_collide_across_issuers() -> None:
    ids = Identities((A, B))
    issuers = (A, B, API_KEY_ISSUER)
    subjects = ("alice", f"{B}#alice", f"{A}#alice", "bastion:api-key#alice", "x#y", "#", "a#")
    pairs = list(itertools.product(issuers, subjects))
    named = {ids.id_of(i, s) for i, s in pairs}
    assert len(named) == len(pairs)
    qualified = {n for n in named if n.partition("#")[0] in (A, B, API_KEY_ISSUER)}
    assert all(ids.resolve(n) == n for n in qualified | {"alice"}), "an id written in config names itself"


def test_same_identity_names_a_group_as_its_earliest_issuer() -> None:
    ids = Identities((A, B, C), ((C, A), (B, API_KEY_ISSUER)))
    assert ids.id_of(C, "alice") == ids.id_of(A, "alice") == "alice"
    assert ids.id_of(API_KEY_ISSUER, "svc") == ids.id_of(B, "svc") == f"{B}#svc"


def test_config_entries_resolve_to_ids() -> None:
    ids = Identities((A, B, C), ((A, C),))
    assert ids.resolve("alice") == "alice"
    assert ids.resolve(f"{A}#alice") == "alice"
    assert ids.resolve(f"{C}#alice") == "alice"
    assert ids.resolve(f"{B}#alice") == f"{B}#alice"
    assert ids.resolve("bastion:api-key#svc") == "bastion:api-key#svc"
    assert ids.resolve(f"{A}#team#blue") == "team#blue"
    assert ids.resolve(f"{A}#{B}#alice") == f"{A}#{B}#alice"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("https://idp-x.test#alice", "'https://idp-x.test' is not a configured issuer"),
        ("team#blue", f"or {A}#<subject> for a subject containing '#'"),
        (f"{B}#", "no subject after the issuer"),
        ("", "must not be empty"),
    ],
)
def test_entries_naming_no_known_issuer_are_refused(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Identities((A, B)).resolve(entry)


# --- config ------------------------------------------------------------------------------------


def issuers(*names: str) -> list[dict[str, Any]]:
    return [{"issuer": n, "jwks_file": f"{i}.json"} for i, n in enumerate(names)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"identity": {"issuers": issuers(A), "same_identity": [[A, B]]}},
            f"identity: .*same_identity: '{B}' is neither a configured issuer nor bastion:api-key",
        ),
        ({"identity": {"issuers": issuers(A, B), "same_identity": [[A]]}}, "at least two"),
        (
            {"identity": {"issuers": issuers(A, B, C), "same_identity": [[A, B], [B, C]]}},
            f"issuer '{B}' is named twice",
        ),
        (
            {"identity": {"issuers": issuers("bastion:api-key")}},
            "identity: .*issuers: issuer 'bastion:api-key'",
        ),
        ({"identity": {"issuers": issuers("https://idp.test/#x")}}, "nor contain '#'"),
        (
            {"identity": {"issuers": issuers(A)}, "admin": {"subjects": ["root", f"{B}#root"]}},
            f"admin.subjects.1: '{B}#root': '{B}' is not a configured issuer",
        ),
        (
            {
                "identity": {"issuers": issuers(A)},
                "budgets": [{"name": "b", "limit": 1, "window": "1d", "match": {"users": ["x#y"]}}],
            },
            "budgets.0.match.users.0: 'x#y'",
        ),
    ],
)
def test_config_refuses_ambiguous_identities(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_mod.parse(data, Path("."))


def test_config_accepts_users_of_every_issuer() -> None:
    cfg = config_mod.parse(
        {
            "identity": {"issuers": issuers(A, B), "same_identity": [[B, API_KEY_ISSUER]]},
            "admin": {"subjects": ["root", f"{B}#ops", "bastion:api-key#svc"]},
        },
        Path("."),
    )
    ids = cfg.identity.identities()
    assert [ids.resolve(s) for s in cfg.admin.subjects] == ["root", f"{B}#ops", f"{B}#svc"]


# --- the Authenticator names every principal ---------------------------------------------------


def jwks(tmp_path: Path, key: SigningKey) -> Path:
    path = tmp_path / f"{key.kid}.json"
    path.write_text(json.dumps(key.jwks))
    return path


async def authenticator(tmp_path: Path, *, same: list[list[str]] | None = None) -> Authenticator:
    cfg = IdentityConfig(
        issuers=[
            IssuerConfig(issuer=A, jwks_file=jwks(tmp_path, KEY_A)),
            IssuerConfig(issuer=B, jwks_file=jwks(tmp_path, KEY_B)),
            IssuerConfig(issuer=C, jwks_file=jwks(tmp_path, KEY_C), audiences=["api://bastion"]),
        ],
        api_keys=[ApiKeyConfig(prefix=API_PREFIX, sha256=API_SHA, sub="alice")],
        same_identity=same or [],
    )
    auth = Authenticator(cfg, BASE, ["notes"])
    await auth.start()
    return auth


def bearer(key: SigningKey, issuer: str, sub: str = "alice", audience: str | list[str] = BASE) -> str:
    return f"Bearer {key.mint(sub, audience=audience, issuer=issuer)}"


async def test_principals_carry_their_id(tmp_path: Path) -> None:
    auth = await authenticator(tmp_path)
    try:
        a = await auth.authenticate(bearer(KEY_A, A))
        b = await auth.authenticate(bearer(KEY_B, B))
        key = await auth.authenticate(f"Bearer {API_KEY}")
        assert (a.sub, a.id) == ("alice", "alice")
        assert (b.sub, b.id) == ("alice", f"{B}#alice")
        assert (key.sub, key.issuer, key.id) == ("alice", API_KEY_ISSUER, "bastion:api-key#alice")
        assert len({a.key, b.key, key.key}) == 3
    finally:
        await auth.aclose()


async def test_same_identity_merges_issuers_on_purpose(tmp_path: Path) -> None:
    auth = await authenticator(tmp_path, same=[[B, A]])
    try:
        a = await auth.authenticate(bearer(KEY_A, A))
        b = await auth.authenticate(bearer(KEY_B, B))
        assert a.id == b.id == "alice"
        assert a.key != b.key, "sessions and approvals' bindings still tell the tokens apart"
    finally:
        await auth.aclose()


async def test_gateway_only_refuses_a_token_meant_for_an_upstream(tmp_path: Path) -> None:
    auth = await authenticator(tmp_path)
    try:
        upstream = bearer(KEY_A, A, audience=f"{BASE}/mcp/notes")
        assert (await auth.authenticate(upstream, "notes")).id == "alice"
        assert (await auth.authenticate(upstream)).id == "alice"
        with pytest.raises(AuthError, match=f"the admin API needs a token meant for {BASE}") as info:
            await auth.authenticate(upstream, gateway_only=True)
        assert info.value.error == "invalid_token"
        both = bearer(KEY_A, A, audience=[f"{BASE}/mcp/notes", BASE])
        assert (await auth.authenticate(both, gateway_only=True)).id == "alice"
        own_list = bearer(KEY_C, C, audience="api://bastion")
        assert (await auth.authenticate(own_list, gateway_only=True)).id == f"{C}#alice"
        assert (await auth.authenticate(f"Bearer {API_KEY}", gateway_only=True)).issuer == API_KEY_ISSUER
    finally:
        await auth.aclose()


def test_a_config_copied_past_validation_still_cannot_be_ambiguous(tmp_path: Path) -> None:
    cfg = IdentityConfig(issuers=[IssuerConfig(issuer=A, jwks_file=jwks(tmp_path, KEY_A))])
    bad = cfg.model_copy(update={"same_identity": [[A, B]]})
    with pytest.raises(ConfigError, match=f"identity: '{B}' is neither a configured issuer"):
        Authenticator(bad, BASE, [])
