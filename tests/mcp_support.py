"""Helpers shared by the end-to-end MCP tests: the SDK's client with a token, raw 2026-07-28
requests, and the audit records a gateway wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.app import Gateway

MODES = ["legacy", "2026-07-28"]


@asynccontextmanager
async def mcp_client(url: str, token: str | None, mode: str) -> AsyncIterator[Client]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=10) as hc,
        Client(streamable_http_client(url, http_client=hc), mode=mode) as client,
    ):
        yield client


def modern_headers(token: str, method: str, name: str | None = None) -> dict[str, str]:
    hdrs = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": method,
    }
    if name:
        hdrs["mcp-name"] = name
    return hdrs


def modern_call(name: str, arguments: dict[str, Any], msg_id: int = 1) -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": meta},
    }


async def audit_rows(gw: Gateway) -> list[dict[str, Any]]:
    assert gw.store is not None
    return [r.to_json() async for r in gw.store.iter_records()]


async def audit_row(gw: Gateway, audit_id: str) -> dict[str, Any]:
    rows = [r for r in await audit_rows(gw) if r["id"] == audit_id]
    assert len(rows) == 1, f"expected one audit record {audit_id}, found {len(rows)}"
    return rows[0]
