"""Redaction through the real gateway: a real MCP upstream that records what it receives and
returns PII, the SDK client in both eras, real Cedar, the real SQLite audit file."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.types import EmbeddedResource, TextContent, TextResourceContents

from gateway.app import Gateway
from gateway.identity.devkeys import DevKey
from tests.conftest import POLICIES, free_port, make_config, running, running_gateway

MODES = ["legacy", "2026-07-28"]
EMAIL = "jane.roe@example.org"
SSN = "219-09-9999"
CARD = "4111 1111 1111 1111"
CARD_DIGITS = "4111111111111111"
PHONE = "(415) 555-0132"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PLANTED = [EMAIL, SSN, CARD, CARD_DIGITS, PHONE, AWS_KEY, "jane.roe", "219099999"]

RECEIVED: list[tuple[str, dict[str, Any]]] = []
"""What the upstream's tools were called with, in order."""


def crm_server() -> MCPServer:
    srv = MCPServer("crm")

    @srv.tool()
    def send(to: str, body: str) -> str:
        RECEIVED.append(("send", {"to": to, "body": body}))
        return "sent"

    @srv.tool()
    def store(record: dict[str, Any]) -> str:
        RECEIVED.append(("store", {"record": record}))
        return "stored"

    @srv.tool()
    def pay(note: str) -> str:
        RECEIVED.append(("pay", {"note": note}))
        return "paid"

    @srv.tool()
    def export(contact: str) -> str:
        RECEIVED.append(("export", {"contact": contact}))
        return f"exported {contact}"

    @srv.tool()
    def post(text: str) -> str:
        RECEIVED.append(("post", {"text": text}))
        return "posted"

    @srv.tool()
    def lookup(name: str) -> str:
        return f"{name}: {EMAIL}, SSN {SSN}, card {CARD}, phone {PHONE}"

    @srv.tool()
    def profile(name: str) -> dict[str, Any]:
        return {"name": name, "contact": {"email": EMAIL, "phones": [PHONE]}, "visits": 3}

    @srv.tool()
    def attachment(name: str) -> list[Any]:
        doc = TextResourceContents(uri=f"crm://docs/{name}", mimeType="text/plain", text=f"SSN {SSN}")
        return [
            TextContent(type="text", text="see attachment"),
            EmbeddedResource(type="resource", resource=doc),
        ]

    @srv.tool()
    def raw(name: str) -> str:
        return f"{name}: {EMAIL}"

    @srv.tool()
    def obliged(text: str) -> str:
        RECEIVED.append(("obliged", {"text": text}))
        return f"you said {text}"

    @srv.tool()
    def leak_card(name: str) -> str:
        return f"{name} pays with {CARD}"

    return srv


REDACTION = {
    "default": {"arguments": "replace", "results": "replace"},
    "tools": {
        "crm/export": {"arguments": "hash", "results": "hash"},
        "crm/pay": {"arguments": {"CREDIT_CARD": "deny", "*": "replace"}},
        "crm/raw": {"arguments": "none", "results": "none"},
        "crm/obliged": {"arguments": "none", "results": "none"},
        "crm/leak_card": {"results": {"CREDIT_CARD": "deny", "*": "mask"}},
        "crm/post": {"arguments": "none"},
    },
}

CRM_POLICY = """
@id("developers-use-crm")
permit (principal in Group::"developers", action, resource in Upstream::"crm");

@id("redact-obliged") @reason("obliged output may hold PII") @obligation("redact")
permit (principal in Group::"developers", action == Action::"call_tool", resource == Tool::"crm/obliged");

@id("no-ssn-in-posts") @reason("social security numbers may not be posted")
forbid (principal, action == Action::"call_tool", resource == Tool::"crm/post")
when { context.pii.contains("US_SSN") };
"""


@pytest.fixture(scope="module")
async def crm() -> AsyncIterator[str]:
    """The recording CRM upstream's base URL."""
    async with running(crm_server().streamable_http_app(streamable_http_path="/mcp"), lifespan="on") as up:
        yield up


@pytest.fixture(scope="module")
async def gw(
    crm: str, data_dir: Path, dev_key: DevKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Gateway, Path]]:
    """Bastion with redaction in front of the CRM upstream: (base URL, gateway, audit DB path)."""
    tmp = tmp_path_factory.mktemp("redaction")
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "crm.cedar").write_text(CRM_POLICY)
    audit_db = tmp / "audit.db"
    cfg = make_config(
        data_dir,
        {"crm": f"{crm}/mcp"},
        free_port(),
        policies,
        redaction=REDACTION,
        audit={"url": f"sqlite+aiosqlite:///{audit_db}"},
    )
    async with running_gateway(cfg) as (base, gateway):
        yield base, gateway, audit_db


@asynccontextmanager
async def client(
    gw: tuple[str, Gateway, Path], dev_key: DevKey, mode: str = "2026-07-28"
) -> AsyncIterator[Client]:
    base = gw[0]
    token = dev_key.mint("dev", groups=("developers",), audience=f"{base}/mcp/crm")
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=10) as hc,
        Client(streamable_http_client(f"{base}/mcp/crm", http_client=hc), mode=mode) as c,
    ):
        yield c


def text_of(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


async def audit_of(gateway: Gateway, audit_id: str) -> dict[str, Any]:
    assert gateway.store is not None
    rows = [r.to_json() async for r in gateway.store.iter_records() if r.id == audit_id]
    assert len(rows) == 1
    return rows[0]


async def last_audit(gateway: Gateway, tool: str) -> dict[str, Any]:
    assert gateway.store is not None
    rows = [r.to_json() async for r in gateway.store.iter_records() if r.tool == tool]
    return rows[-1]


def last_received(tool: str) -> dict[str, Any]:
    return [args for name, args in RECEIVED if name == tool][-1]


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_arguments_are_redacted_before_the_upstream_sees_them(
    gw: tuple[str, Gateway, Path], dev_key: DevKey, mode: str
) -> None:
    body = f"Reach me at {EMAIL} or {PHONE}; SSN {SSN}. Thanks!"
    async with client(gw, dev_key, mode) as c:
        result = await c.call_tool("send", {"to": "support", "body": body})
    assert text_of(result) == "sent"
    got = last_received("send")
    assert got["to"] == "support"
    assert got["body"] == "Reach me at <EMAIL_ADDRESS> or <PHONE_NUMBER>; SSN <US_SSN>. Thanks!"
    record = await last_audit(gw[1], "send")
    assert record["decision"]["effect"] == "transform"
    assert "redaction" in record["decision"]["policy_ids"]
    assert record["pii"]["input"] == {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "US_SSN": 1}
    assert record["args_redacted"] == {"to": "support", "body": got["body"]}


async def test_nested_arguments_keep_their_structure(gw: tuple[str, Gateway, Path], dev_key: DevKey) -> None:
    record = {"name": "Jane", "emails": [EMAIL, "nobody"], "card": int(CARD_DIGITS), "age": 41, "vip": True}
    async with client(gw, dev_key) as c:
        await c.call_tool("store", {"record": record})
    got = last_received("store")["record"]
    assert got == {
        "name": "Jane",
        "emails": ["<EMAIL_ADDRESS>", "nobody"],
        "card": "<CREDIT_CARD>",
        "age": 41,
        "vip": True,
    }


EVASIONS = {
    "zero-width": ("mail j\u200bane.roe@exa\u200dmple.org now", "EMAIL_ADDRESS"),
    "bidi": ("mail \u202ejane.roe@example.org\u202c now", "EMAIL_ADDRESS"),
    "soft-hyphen": ("ssn 219\u00ad-09-9999 ok", "US_SSN"),
    "full-width digits": (
        "card " + "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in CARD) + " ok",
        "CREDIT_CARD",
    ),
    "dotted card": ("card 4111.1111.1111.1111 ok", "CREDIT_CARD"),
    "spaced card": ("card 4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 ok", "CREDIT_CARD"),
    "slashed card": ("card 4111/1111/1111/1111 ok", "CREDIT_CARD"),
    "base64": ("blob " + base64.b64encode(f"contact {EMAIL} today".encode()).decode(), "EMAIL_ADDRESS"),
    "url-encoded": ("q=jane.roe%40example.org&x=1", "EMAIL_ADDRESS"),
    "hex": ("hex " + f"ssn {SSN} ok".encode().hex(), "US_SSN"),
    "base64 of url-encoded": (
        "b " + base64.b64encode(b"to=jane.roe%40example.org&go=1").decode(),
        "EMAIL_ADDRESS",
    ),
}


@pytest.mark.parametrize("name", sorted(EVASIONS))
async def test_every_evasion_is_caught(gw: tuple[str, Gateway, Path], dev_key: DevKey, name: str) -> None:
    text, entity = EVASIONS[name]
    async with client(gw, dev_key) as c:
        await c.call_tool("send", {"to": "x", "body": text})
    got = last_received("send")["body"]
    assert f"<{entity}>" in got
    folded = "".join(ch for ch in got if ch.isalnum())
    for planted in ("janeroe", "2190999", "41111111"):
        assert planted not in folded, got
    record = await last_audit(gw[1], "send")
    assert record["pii"]["input"].get(entity, 0) >= 1


async def test_secrets_are_caught(gw: tuple[str, Gateway, Path], dev_key: DevKey) -> None:
    text = f"aws {AWS_KEY}; db postgres://app:Sup3rS3cret@db.internal/prod; gh ghp_{'a1B2' * 9}"
    async with client(gw, dev_key) as c:
        await c.call_tool("send", {"to": "ops", "body": text})
    got = last_received("send")["body"]
    assert got == "aws <SECRET>; db postgres://app:<SECRET>@db.internal/prod; gh <SECRET>"


async def test_deny_on_entity(gw: tuple[str, Gateway, Path], dev_key: DevKey) -> None:
    before = len(RECEIVED)
    async with client(gw, dev_key) as c:
        result = await c.call_tool("pay", {"note": f"use card {CARD}"})
        allowed = await c.call_tool("pay", {"note": f"invoice to {EMAIL}"})
    assert result.is_error
    assert "CREDIT_CARD" in text_of(result) and CARD not in text_of(result)
    assert [name for name, _ in RECEIVED[before:]] == ["pay"]  # only the second call arrived
    assert last_received("pay") == {"note": "invoice to <EMAIL_ADDRESS>"}
    assert not allowed.is_error
    audit_id = result.structured_content["audit_id"]
    record = await audit_of(gw[1], audit_id)
    assert record["decision"]["effect"] == "deny"
    assert record["decision"]["stage"] == "redaction"
    assert record["pii"]["input"] == {"CREDIT_CARD": 1}
    assert record["args_redacted"] == {"note": "use card <CREDIT_CARD>"}


async def test_hash_is_linkable_without_revealing(gw: tuple[str, Gateway, Path], dev_key: DevKey) -> None:
    async with client(gw, dev_key) as c:
        await c.call_tool("export", {"contact": EMAIL})
        first = last_received("export")["contact"]
        await c.call_tool("export", {"contact": "JANE.ROE@example.org"})
        second = last_received("export")["contact"]
        await c.call_tool("export", {"contact": "john.doe@example.org"})
        other = last_received("export")["contact"]
        result = await c.call_tool("export", {"contact": EMAIL})
    assert first.startswith("<EMAIL_ADDRESS:") and len(first) == len("<EMAIL_ADDRESS:>") + 16
    assert first == second != other
    assert "jane" not in first.lower()
    # the result echoes the pseudonym, which the results rule (hash) leaves alone: no email in it
    assert text_of(result) == f"exported {first}"


async def test_context_pii_reaches_cedar(gw: tuple[str, Gateway, Path], dev_key: DevKey) -> None:
    async with client(gw, dev_key) as c:
        denied = await c.call_tool("post", {"text": f"my ssn is {SSN}"})
        allowed = await c.call_tool("post", {"text": f"write to {EMAIL}"})
    assert denied.is_error and "no-ssn-in-posts" in text_of(denied)
    assert not allowed.is_error
    assert last_received("post") == {"text": f"write to {EMAIL}"}  # arguments: none for this tool
    record = await audit_of(gw[1], denied.structured_content["audit_id"])
    assert record["decision"]["policy_ids"] == ["no-ssn-in-posts"]
    assert record["args_redacted"] == {"text": "my ssn is <US_SSN>"}


async def test_policy_obligation_turns_on_redaction(gw: tuple[str, Gateway, Path], dev_key: DevKey) -> None:
    async with client(gw, dev_key) as c:
        result = await c.call_tool("obliged", {"text": f"hi {EMAIL}"})
    assert last_received("obliged") == {"text": "hi <EMAIL_ADDRESS>"}
    assert text_of(result) == "you said hi <EMAIL_ADDRESS>"
    record = await last_audit(gw[1], "obliged")
    assert record["decision"]["effect"] == "transform"
    assert record["decision"]["policy_ids"][0] == "redact-obliged"


# -- results ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_results_are_redacted_before_the_client_sees_them(
    gw: tuple[str, Gateway, Path], dev_key: DevKey, mode: str
) -> None:
    async with client(gw, dev_key, mode) as c:
        text = await c.call_tool("lookup", {"name": "Jane"})
        structured = await c.call_tool("profile", {"name": "Jane"})
        embedded = await c.call_tool("attachment", {"name": "jane.txt"})
    expected = "Jane: <EMAIL_ADDRESS>, SSN <US_SSN>, card <CREDIT_CARD>, phone <PHONE_NUMBER>"
    assert text_of(text) == expected
    assert text.structured_content == {"result": expected}
    assert structured.structured_content == {
        "name": "Jane",
        "contact": {"email": "<EMAIL_ADDRESS>", "phones": ["<PHONE_NUMBER>"]},
        "visits": 3,
    }
    assert EMAIL not in text_of(structured)
    resource = embedded.content[1].resource
    assert resource.text == "SSN <US_SSN>" and str(resource.uri) == "crm://docs/jane.txt"
    record = await last_audit(gw[1], "lookup")
    # counts are occurrences: the SDK's server puts the text in content and in structuredContent
    assert record["pii"]["output"] == {"CREDIT_CARD": 2, "EMAIL_ADDRESS": 2, "PHONE_NUMBER": 2, "US_SSN": 2}
    assert record["decision"]["effect"] == "transform"


async def test_results_rule_none_passes_and_deny_withholds(
    gw: tuple[str, Gateway, Path], dev_key: DevKey
) -> None:
    async with client(gw, dev_key) as c:
        raw = await c.call_tool("raw", {"name": "Jane"})
        withheld = await c.call_tool("leak_card", {"name": "Jane"})
    assert text_of(raw) == f"Jane: {EMAIL}"  # the control: redaction off for this tool
    assert withheld.is_error and CARD not in text_of(withheld)
    assert "CREDIT_CARD" in text_of(withheld)
    record = await last_audit(gw[1], "leak_card")
    assert record["decision"]["effect"] == "deny" and record["pii"]["output"] == {"CREDIT_CARD": 2}


# -- the audit file ---------------------------------------------------------------------------


async def test_audit_file_never_holds_a_planted_value(gw: tuple[str, Gateway, Path], dev_key: DevKey) -> None:
    async with client(gw, dev_key) as c:
        await c.call_tool("send", {"to": EMAIL, "body": f"{SSN} {CARD} {PHONE} {AWS_KEY}"})
        await c.call_tool("pay", {"note": CARD})
        await c.call_tool("post", {"text": f"ssn {SSN}"})
        await c.call_tool("lookup", {"name": "Jane"})
        await c.call_tool("raw", {"name": "Jane"})
    _, gateway, audit_db = gw
    assert gateway.store is not None
    records = [r async for r in gateway.store.iter_records()]
    assert len(records) >= 5
    raw_bytes = b"".join(p.read_bytes() for p in audit_db.parent.glob(audit_db.name + "*"))
    assert b"<EMAIL_ADDRESS>" in raw_bytes  # the search looks at the right bytes
    for planted in PLANTED:
        assert planted.encode() not in raw_bytes, planted
    dumped = json.dumps([r.to_json() for r in records])
    for planted in PLANTED:
        assert planted not in dumped, planted
