"""`adapters.client` against a real Bastion and upstream: results, typed refusals, ids, traces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapters_support import api_token, record, records, unique
from conftest import free_port, make_config, running_gateway

from adapters.client import (
    DEFAULT_CLIENT,
    ApprovalRequired,
    AsyncBastionClient,
    BadRequest,
    BastionClient,
    BudgetExceeded,
    CredentialRejected,
    GatewayError,
    ToolDenied,
    ToolError,
    UpstreamFailed,
    new_traceparent,
    resolve_traceparent,
)
from audit.record import AuditRecord
from gateway import config as config_mod
from gateway.app import Gateway

BUDGET = {
    "name": "adapters-add",
    "match": {"tools": ["demo/add"]},
    "per": ["user"],
    "limit": 1,
    "window": "1d",
}


@pytest.fixture(scope="module")
async def bastion(
    data_dir: Path, upstream_url: str, policy_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Gateway]]:
    """Bastion with the demo upstream, a 0.2 s deadline on `countdown`, and one `add` per user."""
    tmp = tmp_path_factory.mktemp("adapters")
    cfg = make_config(
        data_dir,
        {"demo": upstream_url},
        free_port(),
        policy_dir,
        budgets=[BUDGET],
        state={"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"},
        audit={"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"},
    )
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data["upstreams"]["demo"]["tools"]["countdown"] = {"timeout_s": 0.2}
    async with running_gateway(config_mod.parse(data, data_dir)) as running:
        yield running


async def test_sync_client_returns_the_result_and_the_record_names_client_call_and_trace(
    bastion: tuple[str, Gateway], dev_key: Any
) -> None:
    base, gw = bastion
    sub = unique("sync")
    trace = new_traceparent()

    def call() -> Any:
        with BastionClient(base, api_token(dev_key, base, sub), client="my-agent/2.1") as client:
            return client.call_tool("demo", "echo", {"text": "hi"}, call_id="call-42", traceparent=trace)

    result = await asyncio.to_thread(call)
    assert result.text == "hi" and not result.is_error and result.decision == "allow"
    assert result.call_id == "call-42" and result.trace_id == trace.split("-")[1]
    row = await record(gw, result.audit_id, sub)
    assert (row.client, row.call_id, row.trace_id) == ("my-agent/2.1", "call-42", result.trace_id)
    assert row.protocol == "http" and row.outcome["status"] == "completed"


async def test_denial_raises_tool_denied_with_reasons_and_audit_id(
    bastion: tuple[str, Gateway], dev_key: Any
) -> None:
    base, gw = bastion
    sub = unique("deny")
    async with AsyncBastionClient(base, api_token(dev_key, base, sub)) as client:
        with pytest.raises(ToolDenied) as info:
            await client.call_tool("demo", "transfer", {"amount": 5000, "to": "x"})
    err = info.value
    assert type(err) is ToolDenied and err.status == 403 and err.stage == "policy"
    assert [r.policy for r in err.reasons] == ["transfer-limit"]
    assert str(err) == "denied by policy transfer-limit: transfers above 1000 need a human"
    assert err.call_id  # a fresh UUID, recorded
    row = await record(gw, str(err.audit_id), sub)
    assert row.effect == "deny" and row.call_id == err.call_id and row.client == DEFAULT_CLIENT


async def test_budget_exceeded_carries_retry_after(bastion: tuple[str, Gateway], dev_key: Any) -> None:
    base, _ = bastion
    async with AsyncBastionClient(base, api_token(dev_key, base, unique("budget"))) as client:
        assert (await client.call_tool("demo", "add", {"a": 1, "b": 2})).structured == {"result": 3}
        with pytest.raises(BudgetExceeded) as info:
            await client.call_tool("demo", "add", {"a": 1, "b": 2})
    assert isinstance(info.value, ToolDenied) and info.value.status == 429
    assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 86400
    assert info.value.reasons[0].policy == "budget/adapters-add" and info.value.audit_id


async def test_upstream_failure_is_upstream_failed(bastion: tuple[str, Gateway], dev_key: Any) -> None:
    base, gw = bastion
    sub = unique("slow")
    async with AsyncBastionClient(base, api_token(dev_key, base, sub)) as client:
        with pytest.raises(UpstreamFailed) as info:
            await client.call_tool("demo", "countdown", {"n": 40})
    assert info.value.status == 504 and info.value.timed_out and "timed out" in str(info.value)
    row = await record(gw, str(info.value.audit_id), sub)
    assert row.outcome["status"] == "timeout"


async def test_tool_level_error_is_a_result_until_raise_for_error(
    bastion: tuple[str, Gateway], dev_key: Any
) -> None:
    base, _ = bastion
    async with AsyncBastionClient(base, api_token(dev_key, base, unique("toolerr"))) as client:
        result = await client.call_tool("demo", "echo", {"wrong": "argument"})
    assert result.is_error
    with pytest.raises(ToolError) as info:
        result.raise_for_error()
    assert info.value.audit_id == result.audit_id and str(info.value) == result.text


async def test_credentials_and_bad_requests(bastion: tuple[str, Gateway], dev_key: Any) -> None:
    base, gw = bastion
    async with AsyncBastionClient(base, "not-a-jwt") as client:
        with pytest.raises(CredentialRejected) as info:
            await client.call_tool("demo", "echo", {"text": "x"})
    assert info.value.status == 401 and info.value.audit_id
    sub = unique("bad")
    async with AsyncBastionClient(base, lambda: api_token(dev_key, base, sub)) as client:
        with pytest.raises(BadRequest, match="no upstream named 'nope'"):
            await client.call_tool("nope", "echo", {})
    assert [r.upstream for r in await records(gw, sub)] == ["nope"]


async def test_unreachable_bastion_is_a_gateway_error() -> None:
    async with AsyncBastionClient(f"http://127.0.0.1:{free_port()}", "t") as client:
        with pytest.raises(GatewayError, match="could not reach Bastion"):
            await client.call_tool("demo", "echo", {"text": "x"}, call_id="c-unreachable")


async def test_decide_answers_without_raising(bastion: tuple[str, Gateway], dev_key: Any) -> None:
    base, gw = bastion
    sub = unique("decide")
    async with AsyncBastionClient(base, api_token(dev_key, base, sub), client="pdp-test/1") as client:
        denied = await client.decide("demo", "delete_note", {"name": "welcome"})
        allowed = await client.decide("demo", "echo", {"text": "x"}, call_id="d-1")
    assert not denied.allowed and denied.reasons[0].policy == "delete-needs-admin"
    assert (
        denied.reason == "denied by policy delete-needs-admin: only admins may use tools that write or delete"
    )
    assert allowed.allowed and allowed.effect == "allow" and allowed.policy_version
    row = await record(gw, allowed.audit_id, sub)
    assert row.outcome["status"] == "decided" and row.client == "pdp-test/1" and row.call_id == "d-1"


async def test_list_tools_is_filtered_by_policy(bastion: tuple[str, Gateway], dev_key: Any) -> None:
    base, _ = bastion
    async with AsyncBastionClient(base, api_token(dev_key, base, unique("list"))) as client:
        names = {t.name for t in await client.list_tools("demo")}
    assert {"echo", "add", "transfer"} <= names and "delete_note" not in names

    def sync_list() -> set[str]:
        with BastionClient(base, api_token(dev_key, base, unique("list"), ("developers", "admins"))) as c:
            return {t.name for t in c.list_tools("demo")}

    assert "delete_note" in await asyncio.to_thread(sync_list)


async def test_sync_list_tools_refuses_to_run_inside_an_event_loop(bastion: tuple[str, Gateway]) -> None:
    with BastionClient(bastion[0], "t") as client, pytest.raises(RuntimeError, match="AsyncBastionClient"):
        client.list_tools("demo")


async def test_gateway_refuses_a_malformed_client_header(bastion: tuple[str, Gateway], dev_key: Any) -> None:
    base, _ = bastion
    headers = {"authorization": f"Bearer {api_token(dev_key, base, 'hdr')}", "x-bastion-client": "x" * 101}
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"{base}/v1/tool-calls", json={"upstream": "demo", "tool": "echo"}, headers=headers
        )
    assert r.status_code == 400 and "X-Bastion-Client" in r.json()["message"]
    with pytest.raises(ValueError, match="name/version"):
        BastionClient(base, "t", client="bad\nname")


def test_traceparent_is_checked_taken_from_opentelemetry_or_started() -> None:
    with pytest.raises(ValueError, match="not a W3C traceparent"):
        resolve_traceparent("00-123-abc-01")
    with pytest.raises(ValueError, match="not all zero"):
        resolve_traceparent(f"00-{'0' * 32}-{'1' * 16}-01")
    given = f"00-{'a' * 32}-{'b' * 16}-01"
    assert resolve_traceparent(given) == given
    fresh = resolve_traceparent(None)
    assert fresh != resolve_traceparent(None) and fresh.startswith("00-") and fresh.endswith("-01")
    trace = pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api is not installed")
    ctx = trace.SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(ctx)):
        assert resolve_traceparent(None) == f"00-{0xABC:032x}-{0xDEF:016x}-01"


async def test_approval_answer_is_approval_required() -> None:
    """Bastion cannot hold calls for approval yet: the 202 answer is simulated."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = {"decision": "approval_required", "approval_id": "ap-1", "audit_id": "a-1",
                "reasons": [{"policy": "big-refund", "reason": "refunds need a manager"}]}  # fmt: skip
        return httpx.Response(202, json=body)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with http, AsyncBastionClient("http://bastion.test", "t", http_client=http) as client:
        with pytest.raises(ApprovalRequired) as info:
            await client.call_tool("demo", "refund", {"amount": 10})
    assert info.value.approval_id == "ap-1" and info.value.audit_id == "a-1"
    assert str(info.value) == "denied by policy big-refund: refunds need a manager"


def test_records_without_client_still_parse() -> None:
    """Records written before `client` existed have no such key: they load with client None."""
    doc = {
        "id": "r1", "ts": "2026-01-01T00:00:00.000000Z", "instance": "i", "trace_id": "t", "call_id": None,
        "user": "u", "tenant": None, "agent": None, "protocol": "http", "upstream": "demo", "tool": "echo",
        "action": "call_tool", "args_redacted": {}, "args_hmac": None, "decision": {}, "budget": None,
        "pii": {}, "outcome": {}, "result_sha256": None,
    }  # fmt: skip
    rec = AuditRecord.from_json(doc)
    assert rec.client is None and rec.to_json()["client"] is None
