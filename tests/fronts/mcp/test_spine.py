"""The spine end to end: the SDK's MCP client -> Bastion -> a real MCP server, both eras."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
import yaml
from mcp import Client
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_support import MODES, audit_row, audit_rows, mcp_client, modern_call, modern_headers

from audit.store import AuditStore
from gateway.app import Gateway
from gateway.identity.devkeys import ensure_dev_key

UPSTREAMS = ["demo", "legacy"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("mode", MODES)
async def test_tools_list_is_filtered_by_policy(
    gateway: tuple[str, Gateway], token: Callable[..., str], mode: str, upstream: str
) -> None:
    base, _ = gateway
    url = f"{base}/mcp/{upstream}"
    async with mcp_client(url, token(upstream=upstream), mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert names == {"echo", "add", "read_note", "transfer", "countdown"}, (
        "developers must not see delete_note"
    )
    async with mcp_client(url, token("root", ("developers", "admins"), upstream=upstream), mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert "delete_note" in names


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("mode", MODES)
async def test_allowed_call_equals_direct_call(
    gateway: tuple[str, Gateway], token: Callable[..., str], upstream_url: str, mode: str, upstream: str
) -> None:
    base, gw = gateway
    async with Client(upstream_url, mode=mode) as direct:
        expected = await direct.call_tool("add", {"a": 2, "b": 40})
    async with mcp_client(f"{base}/mcp/{upstream}", token(upstream=upstream), mode) as client:
        got = await client.call_tool("add", {"a": 2, "b": 40})
    assert got.is_error is False
    assert got.content == expected.content
    assert got.structured_content == expected.structured_content == {"result": 42}
    rows = [r for r in await audit_rows(gw) if r["tool"] == "add" and r["upstream"] == upstream]
    assert rows and rows[-1]["decision"]["effect"] == "allow"
    assert rows[-1]["outcome"]["status"] == "completed"
    assert rows[-1]["user"] == "dev"


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("mode", MODES)
async def test_denied_call_is_a_readable_tool_error(
    gateway: tuple[str, Gateway], token: Callable[..., str], mode: str, upstream: str
) -> None:
    base, gw = gateway
    async with mcp_client(f"{base}/mcp/{upstream}", token(upstream=upstream), mode) as client:
        result = await client.call_tool("transfer", {"amount": 5000, "to": "mallory"})
    assert result.is_error is True
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith("denied by policy transfer-limit:")
    sc = result.structured_content
    assert sc is not None and sc["decision"] == "deny"
    assert sc["reasons"][0]["policy"] == "transfer-limit"
    row = await audit_row(gw, sc["audit_id"])
    assert row["decision"]["effect"] == "deny"
    assert row["decision"]["policy_ids"] == ["transfer-limit"]
    assert row["outcome"]["status"] == "denied"
    # `audit.arguments: redacted` (the default): values kept for review, findings replaced (none here)
    assert row["args_redacted"] == {"amount": 5000, "to": "mallory"}


async def test_small_transfer_is_allowed(gateway: tuple[str, Gateway], token: Callable[..., str]) -> None:
    base, _ = gateway
    async with mcp_client(f"{base}/mcp/demo", token(), "2026-07-28") as client:
        result = await client.call_tool("transfer", {"amount": 10, "to": "bob"})
    assert result.is_error is False
    assert result.structured_content == {"result": "transferred 10 to bob"}


@pytest.mark.parametrize("upstream", UPSTREAMS)
async def test_streamed_progress_passes_through(
    gateway: tuple[str, Gateway], token: Callable[..., str], upstream: str
) -> None:
    base, gw = gateway
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with mcp_client(f"{base}/mcp/{upstream}", token(upstream=upstream), "legacy") as client:
        result = await client.call_tool("countdown", {"n": 3}, progress_callback=on_progress)
    assert result.structured_content == {"result": "liftoff"}
    assert progress == [0, 1, 2]
    rows = [r for r in await audit_rows(gw) if r["tool"] == "countdown" and r["upstream"] == upstream]
    assert rows[-1]["outcome"]["status"] == "completed" and rows[-1]["result_sha256"]


async def test_sse_events_arrive_before_the_stream_ends(
    gateway: tuple[str, Gateway], token: Callable[..., str], http: httpx.AsyncClient
) -> None:
    """Progress events are relayed as they happen, not buffered until the result."""
    import time

    base, _ = gateway
    tok = token()
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    hdrs = {"authorization": f"Bearer {tok}", "accept": "application/json, text/event-stream"}
    r = await http.post(f"{base}/mcp/demo", json=init, headers=hdrs)
    assert r.status_code == 200
    sid = r.headers["mcp-session-id"]
    hdrs |= {"mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
    await http.post(
        f"{base}/mcp/demo", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=hdrs
    )
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "countdown", "arguments": {"n": 4}, "_meta": {"progressToken": "p"}},
    }
    arrivals: list[tuple[float, str]] = []
    start = time.perf_counter()
    async with http.stream("POST", f"{base}/mcp/demo", json=call, headers=hdrs) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                arrivals.append((time.perf_counter() - start, line))
    assert len(arrivals) == 5
    assert '"result"' in arrivals[-1][1]
    # the tool sleeps 50 ms per step: the first progress event must arrive well before the result
    assert arrivals[-1][0] - arrivals[0][0] > 0.1


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("none", 401),
        ("expired", 401),
        ("wrong_audience", 401),
        ("wrong_issuer", 401),
        ("forged", 401),
        ("alg_none", 401),
    ],
)
async def test_bad_tokens_get_401_with_resource_metadata(
    gateway: tuple[str, Gateway],
    token: Callable[..., str],
    http: httpx.AsyncClient,
    tmp_path: Path,
    case: str,
    status: int,
) -> None:
    base, gw = gateway
    aud = f"{base}/mcp/demo"
    tokens = {
        "none": None,
        "expired": token(ttl_s=-3600),
        "wrong_audience": token(audience="https://elsewhere.example/mcp/demo"),
        "wrong_issuer": token(issuer="https://evil.example"),
        "forged": ensure_dev_key(tmp_path).mint("dev", audience=aud, groups=["admins"]),
        "alg_none": jwt.encode(
            {"sub": "dev", "iss": "bastion-dev", "aud": aud, "exp": 4102444800, "groups": ["admins"]},
            key=None,
            algorithm="none",
        ),
    }
    tok = tokens[case]
    body = modern_call("echo", {"text": "hi"}, msg_id=7)
    hdrs = modern_headers(tok or "", "tools/call", "echo")
    if tok is None:
        del hdrs["authorization"]
    before = len(await audit_rows(gw))
    r = await http.post(aud, json=body, headers=hdrs)
    assert r.status_code == status
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{base}/.well-known/oauth-protected-resource/mcp/demo"' in challenge
    assert r.json()["error"]["code"] == -32001
    rows = await audit_rows(gw)
    assert len(rows) == before + 1, "a refused tools/call is audited too"
    assert rows[-1]["decision"]["stage"] == "identity" and rows[-1]["user"] is None

    meta = await http.get(f"{base}/.well-known/oauth-protected-resource/mcp/demo")
    assert meta.status_code == 200
    assert meta.json()["resource"] == aud
    assert "authorization_servers" not in meta.json(), "RFC 9728 lists issuer URLs; the dev issuer is none"


async def test_sdk_client_without_token_fails(gateway: tuple[str, Gateway]) -> None:
    base, _ = gateway
    with pytest.raises(Exception) as info:
        async with mcp_client(f"{base}/mcp/demo", None, "2026-07-28") as client:
            await client.list_tools()
    assert "401" in repr(info.value) or isinstance(info.value, MCPError | ExceptionGroup)


async def test_session_is_bound_to_its_principal(
    gateway: tuple[str, Gateway], token: Callable[..., str], http: httpx.AsyncClient
) -> None:
    base, _ = gateway
    url = f"{base}/mcp/legacy"
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    accept = {"accept": "application/json, text/event-stream"}
    alice = {"authorization": f"Bearer {token('alice', upstream='legacy')}", **accept}
    r = await http.post(url, json=init, headers=alice)
    sid = r.headers["mcp-session-id"]
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    own = await http.post(
        url, json=listing, headers={**alice, "mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
    )
    assert own.status_code == 200
    mallory = {"authorization": f"Bearer {token('mallory', upstream='legacy')}", **accept}
    stolen = await http.post(
        url, json=listing, headers={**mallory, "mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
    )
    assert stolen.status_code == 404
    forged = await http.post(url, json=listing, headers={**alice, "mcp-session-id": sid[:-3] + "AAA"})
    assert forged.status_code == 404
    missing = await http.post(url, json=listing, headers=alice)
    assert missing.status_code == 400
    bye = await http.delete(
        url, headers={**alice, "mcp-session-id": sid, "mcp-protocol-version": "2025-11-25"}
    )
    assert bye.status_code in (200, 204)


async def test_foreign_origin_is_refused(
    gateway: tuple[str, Gateway], token: Callable[..., str], http: httpx.AsyncClient
) -> None:
    base, _ = gateway
    hdrs = modern_headers(token(), "tools/call", "echo") | {"origin": "http://evil.example"}
    r = await http.post(f"{base}/mcp/demo", json=modern_call("echo", {"text": "x"}), headers=hdrs)
    assert r.status_code == 403
    hdrs["origin"] = base
    r = await http.post(f"{base}/mcp/demo", json=modern_call("echo", {"text": "x"}), headers=hdrs)
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        ("method_header", -32020),
        ("name_header", -32020),
        ("duplicate_key", -32700),
        ("batch", -32600),
        ("not_json", -32700),
    ],
)
async def test_malformed_requests_are_refused(
    gateway: tuple[str, Gateway], token: Callable[..., str], http: httpx.AsyncClient, mutate: str, code: int
) -> None:
    base, _ = gateway
    hdrs = modern_headers(token(), "tools/call", "echo")
    content = json.dumps(modern_call("echo", {"text": "x"}))
    if mutate == "method_header":
        hdrs["mcp-method"] = "tools/list"
    elif mutate == "name_header":
        hdrs["mcp-name"] = "delete_note"
    elif mutate == "duplicate_key":
        content = content.replace('"name": "echo"', '"name": "echo", "name": "delete_note"')
    elif mutate == "batch":
        content = f"[{content}]"
    elif mutate == "not_json":
        content = "{nope"
    r = await http.post(
        f"{base}/mcp/demo", content=content, headers=hdrs | {"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code


async def test_modern_client_on_legacy_upstream_uses_shared_session(
    gateway: tuple[str, Gateway], token: Callable[..., str], legacy_upstream: tuple[str, Any]
) -> None:
    base, _ = gateway
    _, wrapper = legacy_upstream
    async with mcp_client(f"{base}/mcp/legacy", token(upstream="legacy"), "2026-07-28") as client:
        r1 = await client.call_tool("echo", {"text": "one"})
        r2 = await client.call_tool("echo", {"text": "two"})
    assert [r1.structured_content, r2.structured_content] == [{"result": "one"}, {"result": "two"}]
    assert "server/discover" in wrapper.seen_methods
    inits = wrapper.seen_methods.count("initialize")
    async with mcp_client(f"{base}/mcp/legacy", token(upstream="legacy"), "2026-07-28") as client:
        await client.call_tool("echo", {"text": "three"})
    assert wrapper.seen_methods.count("initialize") == inits, (
        "stateless clients reuse the shared upstream session"
    )


async def test_legacy_client_ping_on_modern_upstream(
    gateway: tuple[str, Gateway], token: Callable[..., str]
) -> None:
    base, _ = gateway
    async with mcp_client(f"{base}/mcp/demo", token(), "legacy") as client:
        with pytest.warns(MCPDeprecationWarning):
            assert await client.send_ping() is not None


async def test_audit_export_jsonl(
    gateway: tuple[str, Gateway], token: Callable[..., str], tmp_path: Path
) -> None:
    base, gw = gateway
    async with mcp_client(f"{base}/mcp/demo", token(), "2026-07-28") as client:
        await client.call_tool("echo", {"text": "exported"})
        await client.call_tool("delete_note", {"name": "welcome"})
    out = tmp_path / "audit.jsonl"
    config = tmp_path / "bastion.yaml"
    config.write_text(yaml.safe_dump({"audit": {"url": gw.cfg.audit.url}}))
    cli = [
        sys.executable,
        "-m",
        "gateway.cli",
        "audit",
        "export",
        "--config",
        str(config),
        "--format",
        "jsonl",
    ]
    proc = await asyncio.create_subprocess_exec(*cli, "-o", str(out), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"exported {len(lines)} records" in err.decode()
    assert len(lines) >= 2
    assert {line["tool"] for line in lines} >= {"echo", "delete_note"}
    deny = [line for line in lines if line["tool"] == "delete_note"][-1]
    assert deny["decision"]["effect"] == "deny" and deny["decision"]["policy_ids"] == ["delete-needs-admin"]
    for line in lines:
        assert set(line) >= {
            "id",
            "ts",
            "schema_version",
            "user",
            "upstream",
            "tool",
            "decision",
            "outcome",
            "args_hmac",
        }
    # `audit.arguments: redacted` (the default) keeps values, findings replaced (none in "exported")
    assert any(line["tool"] == "echo" and line["args_redacted"] == {"text": "exported"} for line in lines)


async def test_audit_store_reopens(gateway: tuple[str, Gateway]) -> None:
    """The records are really in the SQLite file, readable by a fresh store."""
    _, gw = gateway
    store = await AuditStore.open(gw.cfg.audit.url)
    try:
        assert await store.count() > 0
    finally:
        await store.close()


async def test_client_token_never_reaches_the_upstream(
    gateway: tuple[str, Gateway], token: Callable[..., str], legacy_upstream: tuple[str, Any]
) -> None:
    base, _ = gateway
    _, wrapper = legacy_upstream
    before = len(wrapper.seen_headers)
    for mode in MODES:
        async with mcp_client(f"{base}/mcp/legacy", token(upstream="legacy"), mode) as client:
            await client.call_tool("echo", {"text": "secret-free"})
    seen = wrapper.seen_headers[before:]
    assert seen, "the upstream saw the calls"
    for headers in seen:
        assert b"authorization" not in headers
        assert headers[b"host"].decode() == urlsplit(legacy_upstream[0]).netloc, (
            "Host is rewritten for the upstream"
        )
