"""`audit.arguments`: argument values worth replaying, with PII and secrets replaced, never raw.

Through a real gateway (real uvicorn, Cedar, SQLite audit) in front of the demo MCP server, with
no `redaction:` configured: the record keeps the values, the built-in detectors'
(`gateway.redaction.basic`) findings replaced by `<ENTITY>`; `shape` keeps today's shapes; a
configured `redaction:` wins. Then the detectors on their own: each entity, look-alikes left
alone, numbers, keys, the scan limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit.record import shape_of
from gateway.app import Gateway
from gateway.identity.devkeys import DevKey
from gateway.redaction.basic import ENTITIES, SCAN_LIMIT, audit_view, find, redact
from tests.conftest import free_port, make_config, running_gateway
from tests.mcp_support import audit_rows

REPO = Path(__file__).resolve().parents[1]

RAW = {
    "email": "jane.roe@example.org",
    "ssn": "219-09-9999",
    "card": "4111 1111 1111 1111",
    "phone": "+1 415-555-0132",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
    "iban": "DE89 3704 0044 0532 0130 00",
}
ARGUMENTS: dict[str, Any] = {
    "text": "quarterly invoice for ACME",
    "amount": 5000,
    "card_number": 4111111111111111,
    "note": f"write to {RAW['email']} or call {RAW['phone']} about ssn {RAW['ssn']}",
    "payment": {"card": RAW["card"], "iban": RAW["iban"], "approved": True, "ref": None},
    "credentials": [RAW["aws"], f"Bearer {RAW['jwt']}"],
}
EXPECTED: dict[str, Any] = {
    "text": "quarterly invoice for ACME",
    "amount": 5000,
    "card_number": "<CREDIT_CARD>",
    "note": "write to <EMAIL_ADDRESS> or call <PHONE_NUMBER> about ssn <US_SSN>",
    "payment": {"card": "<CREDIT_CARD>", "iban": "<IBAN_CODE>", "approved": True, "ref": None},
    "credentials": ["<SECRET>", "Bearer <SECRET>"],
}
RAW_FORMS = [*RAW.values(), "4111111111111111", "219099999", "DE89370400440532013000", "4155550132"]


@asynccontextmanager
async def gateway_with(
    tmp_path: Path, data_dir: Path, upstream_url: str, **extra: Any
) -> AsyncIterator[tuple[str, Gateway, Path]]:
    """Bastion in front of the demo upstream, with its own audit database (returned)."""
    db = tmp_path / "audit.db"
    audit = {"url": f"sqlite+aiosqlite:///{db}", **extra.pop("audit", {})}
    cfg = make_config(data_dir, {"demo": upstream_url}, free_port(), audit=audit, **extra)
    async with running_gateway(cfg) as (base, gw):
        yield base, gw, db


async def call_echo(
    http: httpx.AsyncClient, base: str, dev_key: DevKey, arguments: dict[str, Any], auth: bool = True
) -> httpx.Response:
    token = dev_key.mint("dev", groups=("developers",), audience=f"{base}/mcp/demo")
    headers = {"authorization": f"Bearer {token}"} if auth else {}
    body = {"upstream": "demo", "tool": "echo", "arguments": arguments}
    return await http.post(f"{base}/v1/tool-calls", json=body, headers=headers)


async def record_of(gw: Gateway, audit_id: str) -> dict[str, Any]:
    [record] = [r for r in await audit_rows(gw) if r["id"] == audit_id]
    return record


def stored_bytes(db: Path) -> bytes:
    """Everything the audit database holds on disk (the file and its write-ahead log)."""
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


# -- through the gateway ------------------------------------------------------------------------


async def test_values_are_kept_and_findings_replaced_without_redaction_configured(
    tmp_path: Path, data_dir: Path, upstream_url: str, dev_key: DevKey, http: httpx.AsyncClient
) -> None:
    async with gateway_with(tmp_path, data_dir, upstream_url) as (base, gw, db):
        assert gw.cfg.redaction is None and gw.cfg.audit.arguments == "redacted"
        answer = await call_echo(http, base, dev_key, ARGUMENTS)
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["content"][0]["text"] == ARGUMENTS["text"]  # forwarded as sent
        record = await record_of(gw, answer.json()["audit_id"])
        assert record["args_redacted"] == EXPECTED
        assert record["outcome"]["status"] == "completed"
        assert record["args_hmac"]  # still covers the originals
        document = json.dumps(record)
        on_disk = stored_bytes(db)
        for raw in RAW_FORMS:
            assert raw not in document, raw
            assert raw.encode() not in on_disk, raw


async def test_shape_keeps_only_types_and_sizes(
    tmp_path: Path, data_dir: Path, upstream_url: str, dev_key: DevKey, http: httpx.AsyncClient
) -> None:
    async with gateway_with(tmp_path, data_dir, upstream_url, audit={"arguments": "shape"}) as (base, gw, _):
        answer = await call_echo(http, base, dev_key, ARGUMENTS)
        assert answer.status_code == 200, answer.text
        record = await record_of(gw, answer.json()["audit_id"])
        assert record["args_redacted"] == shape_of(ARGUMENTS)
        assert (
            record["args_redacted"]["text"] == "<string:26>" and record["args_redacted"]["amount"] == "<int>"
        )


async def test_a_configured_redaction_wins(
    tmp_path: Path, data_dir: Path, upstream_url: str, dev_key: DevKey, http: httpx.AsyncClient
) -> None:
    # IP_ADDRESS is found by the configured redaction only: the built-in detectors keep it
    args = {"host": "192.168.10.20", "to": RAW["email"], "text": "hello"}
    assert audit_view(args)["host"] == "192.168.10.20"
    async with gateway_with(tmp_path, data_dir, upstream_url, redaction={}) as (base, gw, _):
        answer = await call_echo(http, base, dev_key, args)
        assert answer.status_code == 200, answer.text
        record = await record_of(gw, answer.json()["audit_id"])
        assert record["args_redacted"] == {"host": "<IP_ADDRESS>", "to": "<EMAIL_ADDRESS>", "text": "hello"}
        assert record["pii"]["input"] == {"EMAIL_ADDRESS": 1, "IP_ADDRESS": 1}


async def test_an_unauthenticated_call_keeps_its_fixed_size_summary(
    tmp_path: Path, data_dir: Path, upstream_url: str, dev_key: DevKey, http: httpx.AsyncClient
) -> None:
    async with gateway_with(tmp_path, data_dir, upstream_url) as (base, gw, _):
        answer = await call_echo(http, base, dev_key, ARGUMENTS, auth=False)
        assert answer.status_code == 401
        record = await record_of(gw, answer.json()["audit_id"])
        assert record["args_redacted"] == {"unauthenticated": True, "arguments": len(ARGUMENTS)}


def test_the_built_in_detectors_never_import_presidio() -> None:
    code = (
        "import sys\n"
        "from gateway.redaction.basic import audit_view\n"
        "audit_view({'to': 'jane.roe@example.org', 'n': 4111111111111111})\n"
        "print(sorted(m for m in sys.modules if m.startswith(('presidio', 'spacy', 'phonenumbers'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the detectors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "entity", "found"),
    [
        ("AKIAIOSFODNN7EXAMPLE", "SECRET", "AKIAIOSFODNN7EXAMPLE"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "SECRET", "eyJhbGciOiJIUzI1NiJ9"),
        ("ghp_" + "a1B2" * 9, "SECRET", "ghp_"),
        ("postgres://app:hunter2hunter2@db/prod", "SECRET", "hunter2hunter2"),
        ("X-Api-Key: 9fQ2xL7mN4pR8sT1vW3yZ6aB0cD5eG", "SECRET", "9fQ2xL7mN4pR8sT1vW3yZ6aB0cD5eG"),
        ("mail jane.roe+tag@example.co.uk now", "EMAIL_ADDRESS", "jane.roe+tag@example.co.uk"),
        ("card 4111 1111 1111 1111 ok", "CREDIT_CARD", "4111 1111 1111 1111"),
        ("card 5555.5555.5555.4444", "CREDIT_CARD", "5555.5555.5555.4444"),
        ("card 378282246310005", "CREDIT_CARD", "378282246310005"),
        ("ssn 219-09-9999.", "US_SSN", "219-09-9999"),
        ("ssn 219 09 9999", "US_SSN", "219 09 9999"),
        ("iban DE89 3704 0044 0532 0130 00 thanks", "IBAN_CODE", "DE89 3704 0044 0532 0130 00"),
        ("iban GB82WEST12345698765432", "IBAN_CODE", "GB82WEST12345698765432"),
        ("iban NL91 ABNA 0417 1643 00 REF1", "IBAN_CODE", "NL91 ABNA 0417 1643 00"),
        ("iban BE68 5390 0754 7034 REF1 thanks", "IBAN_CODE", "BE68 5390 0754 7034"),  # REF1 cut off
        ("call (415) 555-0132 today", "PHONE_NUMBER", "(415) 555-0132"),
        ("call 415.555.0132", "PHONE_NUMBER", "415.555.0132"),
        ("call +1 415-555-0132", "PHONE_NUMBER", "+1 415-555-0132"),
        ("call +44 20 7946 0958", "PHONE_NUMBER", "+44 20 7946 0958"),
        ("call +4930901820", "PHONE_NUMBER", "+4930901820"),
        ("nino AB 12 34 56 C", "UK_NINO", "AB 12 34 56 C"),
        ("nino AB123456C", "UK_NINO", "AB123456C"),
    ],
)
def test_each_entity_is_found(text: str, entity: str, found: str) -> None:
    [(start, end, got)] = find(text)
    assert got == entity
    assert text[start:end] == found or text[start:end].startswith(found)
    assert found not in redact(text) and f"<{entity}>" in redact(text)


def test_every_entity_is_covered() -> None:
    assert set(ENTITIES) == {
        "SECRET",
        "EMAIL_ADDRESS",
        "CREDIT_CARD",
        "US_SSN",
        "IBAN_CODE",
        "PHONE_NUMBER",
        "UK_NINO",
    }


@pytest.mark.parametrize(
    "text",
    [
        "request 123e4567-e89b-12d3-a456-426614174000",
        "REQUEST 123E4567-E89B-12D3-A456-426614174000",
        "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "at 2026-03-14 12:30:00+01:00, or 14/03/2026, or 2026-03-14T12:30:00Z",
        "order #58213377 shipped, total $1249.99, version 3.12.1",
        "order 4111111111111112 (not Luhn), ids 4155550132 and 219099999",
        "ip 192.168.10.20, port 8080, pid 31337",
        "ssn-like but invalid: 000-12-3456, 666-12-3456, 912-12-3456, 219-00-1234, 219-09-0000, 111-11-1111",
        "not an IBAN: DE00 3704 0044 0532 0130 00, XX89 3704 0044 0532 0130 00",
        "not a NINO: QQ 12 34 56 C, BG 12 34 56 A",
        "phone-like: 123-456-7890, 2026-0314",
        "mail to a@b or x@y.1",
        "the quick brown fox jumps over the lazy dog",
    ],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert find(text) == []
    assert redact(text) == text


def test_numbers_booleans_and_keys() -> None:
    args = {
        "amount": 5000,
        "price": 1249.99,
        "big": 123456789012345,  # 15 digits, no card
        "card": 4111111111111111,
        "card_float": 5555555555554444.0,
        "timestamp_ms": 1718000000000,
        "huge": 10**40,
        "flags": [True, False, None],
        "jane.roe@example.org": "the key is kept",
    }
    assert audit_view(args) == {
        **args,
        "card": "<CREDIT_CARD>",
        "card_float": "<CREDIT_CARD>",
    }


def test_strings_under_credential_keys_are_secrets() -> None:
    args = {
        "password": "hunter2",
        "db": {"user": "app", "db_password": "x", "apiKey": "short", "X-Auth-Token": "abc"},
        "secret_name": "prod/db",
        "max_tokens": "100",
        "token": "",
    }
    assert audit_view(args) == {
        "password": "<SECRET>",
        "db": {"user": "app", "db_password": "<SECRET>", "apiKey": "<SECRET>", "X-Auth-Token": "<SECRET>"},
        "secret_name": "prod/db",
        "max_tokens": "100",
        "token": "",
    }


def test_evasions_are_undone() -> None:
    assert (
        redact("card " + " ".join(["\uff14\uff11\uff11\uff11"] + ["\uff11" * 4] * 3)) == "card <CREDIT_CARD>"
    )  # full-width digits
    assert redact("mail jane\u200b.roe@example.org") == "mail <EMAIL_ADDRESS>"  # zero-width space
    assert redact("blob amFuZS5yb2VAZXhhbXBsZS5vcmc= end") == "blob <EMAIL_ADDRESS> end"  # base64
    assert redact("see https://x.test/?to=jane.roe%40example.org") == "see <EMAIL_ADDRESS>"  # URL-encoded


def test_the_scan_limit_bounds_the_text_scanned() -> None:
    filler = "x" * (SCAN_LIMIT - 40)  # then 32 bytes of "b" fit, 15 of "c" do not
    args = {"a": filler, "b": "mail jane.roe@example.org please", "c": "ssn 219-09-9999", "n": 5, "s": "ok"}
    view = audit_view(args)
    assert view["a"] == filler
    assert view["b"] == "mail <EMAIL_ADDRESS> please"
    assert view["c"] == "<unscanned:15>"  # over the limit: its length only
    assert (view["n"], view["s"]) == (5, "ok")  # nothing to scan in them
    assert audit_view({"a": "y" * (SCAN_LIMIT + 1), "b": "jane.roe@example.org"}) == {
        "a": f"<unscanned:{SCAN_LIMIT + 1}>",
        "b": "<unscanned:20>",
    }


def test_values_json_does_not_give_are_never_stored_as_they_are() -> None:
    """Arguments built in Python (an adapter, a test) rather than parsed from JSON."""
    view = audit_view({"pair": (1, RAW["email"]), "blob": b"raw bytes", "when": object()})
    assert view["pair"] == [1, "<EMAIL_ADDRESS>"]
    assert view["blob"] == "<bytes>" and view["when"] == "<object>"
