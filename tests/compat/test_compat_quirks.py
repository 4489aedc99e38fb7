"""Wire behaviour of real clients that a proxy must tolerate (measured on the wire; see docs/clients.md).

These need no Node: they replay what the clients send.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.call import Decision, Reason
from gateway.fronts.mcp.results import DECISION_META, denied_result
from gateway.identity.devkeys import DEV_ISSUER

ACCEPT = "application/json, text/event-stream"


def legacy_headers(token: str, session: str | None = None) -> dict[str, str]:
    hdrs = {"authorization": f"Bearer {token}", "accept": ACCEPT, "content-type": "application/json"}
    if session:
        hdrs |= {"mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
    return hdrs


def initialize(client_info: dict[str, Any] | None) -> dict[str, Any]:
    params: dict[str, Any] = {"protocolVersion": "2025-11-25", "capabilities": {}}
    if client_info is not None:
        params["clientInfo"] = client_info
    return {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}


def answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message of a JSON or single-event SSE response."""
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        return dict(json.loads(data[-1]))
    return dict(response.json())


async def open_session(http: httpx.AsyncClient, url: str, token: str, info: dict[str, Any] | None) -> str:
    r = await http.post(url, json=initialize(info), headers=legacy_headers(token))
    assert r.status_code == 200, r.text
    assert "result" in answer(r), r.text
    session = r.headers["mcp-session-id"]
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await http.post(url, json=note, headers=legacy_headers(token, session))).status_code == 202
    return session


@pytest.mark.parametrize("upstream", ["demo", "legacy"])
async def test_get_before_any_session_is_a_clean_405(
    gateway: tuple[str, Any], token: Callable[..., str], http: httpx.AsyncClient, upstream: str
) -> None:
    r = await http.get(
        f"{gateway[0]}/mcp/{upstream}",
        headers={"authorization": f"Bearer {token(upstream=upstream)}", "accept": "text/event-stream"},
    )
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"].startswith("no server stream")


@pytest.mark.parametrize(
    "info", [{"name": "no-version-client"}, None], ids=["clientInfo-without-version", "no-clientInfo"]
)
@pytest.mark.parametrize("upstream", ["demo", "legacy"])
async def test_initialize_without_client_version_still_connects(
    gateway: tuple[str, Any],
    token: Callable[..., str],
    http: httpx.AsyncClient,
    info: dict[str, Any] | None,
    upstream: str,
) -> None:
    url, tok = f"{gateway[0]}/mcp/{upstream}", token(upstream=upstream)
    session = await open_session(http, url, tok, info)
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": 2, "b": 3}},
    }
    r = await http.post(url, json=call, headers=legacy_headers(tok, session))
    assert answer(r)["result"]["content"][0]["text"] == "5"


async def test_two_get_streams_on_one_session(
    gateway: tuple[str, Any], token: Callable[..., str], legacy_upstream: Any
) -> None:
    """The first GET stream is relayed; a second on the same session gets the upstream's answer (409)."""
    url, tok = f"{gateway[0]}/mcp/legacy", token(upstream="legacy")
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
        session = await open_session(http, url, tok, {"name": "two-streams", "version": "1"})
        headers = legacy_headers(tok, session) | {"accept": "text/event-stream"}
        async with http.stream("GET", url, headers=headers) as first:
            assert first.status_code == 200
            assert first.headers["content-type"].startswith("text/event-stream")
            second = await asyncio.wait_for(http.get(url, headers=headers), 5)
            assert second.status_code == 409, second.text
        r = await http.delete(url, headers=legacy_headers(tok, session))
        assert r.status_code in (200, 204)


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/oauth-authorization-server",
        "/.well-known/oauth-authorization-server/mcp/demo",
        "/.well-known/openid-configuration",
        "/.well-known/openid-configuration/mcp/demo",
        "/mcp/demo/.well-known/openid-configuration",
        "/.well-known/oauth-protected-resource/mcp/nope",
    ],
)
async def test_unauthenticated_discovery_probes_get_json_404(
    gateway: tuple[str, Any], http: httpx.AsyncClient, path: str
) -> None:
    r = await http.get(gateway[0] + path)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "not_found"


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-protected-resource/mcp/demo", "/.well-known/oauth-protected-resource"]
)
async def test_protected_resource_metadata_lists_only_url_issuers(
    gateway: tuple[str, Any], http: httpx.AsyncClient, path: str
) -> None:
    """RFC 9728: authorization servers are issuer URLs; mcp-remote crashes on `bastion-dev`."""
    r = await http.get(gateway[0] + path)
    assert r.status_code == 200
    meta = r.json()
    assert meta["resource"] == gateway[0] + path.removeprefix("/.well-known/oauth-protected-resource")
    assert DEV_ISSUER not in meta.get("authorization_servers", [])
    assert meta["bearer_methods_supported"] == ["header"]


async def test_unauthenticated_mcp_request_points_at_the_metadata(
    gateway: tuple[str, Any], http: httpx.AsyncClient
) -> None:
    r = await http.post(
        f"{gateway[0]}/mcp/demo", json=initialize({"name": "c", "version": "1"}), headers={"accept": ACCEPT}
    )
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert f'resource_metadata="{gateway[0]}/.well-known/oauth-protected-resource/mcp/demo"' in challenge


DENIED = Decision("deny", (Reason("transfer-limit", "transfers above 1000 need a human"),))
TEXT = "denied by policy transfer-limit: transfers above 1000 need a human"
STRING_RESULT = {"type": "object", "properties": {"result": {"type": "string"}}, "required": ["result"]}
INT_RESULT = {"type": "object", "properties": {"result": {"type": "integer"}}, "required": ["result"]}
CLOSED = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "additionalProperties": False}


@pytest.mark.parametrize(
    ("schema", "structured"),
    [
        (None, {"decision": "deny", "audit_id": "a1"}),
        ({"type": "object"}, {"decision": "deny", "audit_id": "a1"}),
        (STRING_RESULT, {"decision": "deny", "audit_id": "a1", "result": TEXT}),
        (INT_RESULT, None),
        (CLOSED, None),
        ({"type": "no-such-type"}, None),
    ],
    ids=["no-schema", "open-object", "string-result", "integer-result", "closed-object", "broken-schema"],
)
def test_denial_structured_content_conforms_to_the_tools_output_schema(
    schema: dict[str, Any] | None, structured: dict[str, Any] | None
) -> None:
    """TS SDK v1 validates structuredContent against outputSchema even when isError is set."""
    result = denied_result(DENIED, "a1", schema)
    assert result["isError"] is True and result["content"][0]["text"] == TEXT
    assert result["_meta"][DECISION_META]["reasons"] == [r.to_json() for r in DENIED.reasons]
    got = result.get("structuredContent")
    if structured is None:
        assert got is None
    else:
        assert got is not None and {k: got[k] for k in structured} == structured
