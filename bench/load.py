"""The load generator: N stateless (2026-07-28) `tools/call` POSTs at concurrency C, raw httpx."""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PROTOCOL = "2026-07-28"


@dataclass(frozen=True)
class LoadResult:
    calls: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    first_error: str | None = None
    cpu_ms_per_call: dict[str, float] = field(default_factory=dict)
    """CPU time each process spent per counted call: load generator, upstream, gateway."""

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        data = sorted(self.latencies_ms)
        if not data:
            return float("nan")
        k = min(len(data) - 1, max(0, round(p / 100 * len(data) + 0.5) - 1))
        return data[k]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def p95(self) -> float:
        return self.percentile(95)

    @property
    def p99(self) -> float:
        return self.percentile(99)


def call_body(arguments: dict[str, Any], msg_id: int = 1) -> bytes:
    meta = {
        "io.modelcontextprotocol/protocolVersion": PROTOCOL,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    msg = {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": arguments, "_meta": meta},
    }
    return json.dumps(msg, separators=(",", ":")).encode()


def call_headers(token: str | None) -> dict[str, str]:
    hdrs = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": PROTOCOL,
        "mcp-method": "tools/call",
        "mcp-name": "echo",
    }
    if token:
        hdrs["authorization"] = f"Bearer {token}"
    return hdrs


def _check(response: httpx.Response) -> str | None:
    """Why a response is not a successful tool result, or None when it is."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    try:
        msg = json.loads(response.content)
    except ValueError:
        return f"not JSON: {response.text[:200]}"
    result = msg.get("result") if isinstance(msg, dict) else None
    if not isinstance(result, dict) or result.get("isError"):
        return f"not a successful result: {response.text[:200]}"
    return None


async def drive(
    url: str, token: str | None, arguments: dict[str, Any], n: int, concurrency: int, warmup: int = 0
) -> LoadResult:
    """Send `warmup` uncounted calls, then `n` counted calls, `concurrency` in flight at a time.

    Each of the `concurrency` workers is one agent with its own client and keep-alive
    connection. (One shared `httpx.AsyncClient` would scan its whole pool on every request:
    measured here at ~1 ms of CPU per call at 16 connections, which would make the load
    generator, not the servers, the bottleneck.)
    """
    body = call_body(arguments)
    headers = call_headers(token)
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(limits=limits, timeout=30, headers=headers) for _ in range(concurrency)]
    try:

        async def run(count: int, record: bool) -> None:
            remaining = count

            async def worker(client: httpx.AsyncClient) -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    t0 = time.perf_counter()
                    try:
                        response = await client.post(url, content=body)
                        problem = _check(response)
                    except httpx.HTTPError as exc:
                        problem = f"{type(exc).__name__}: {exc}"
                    if record:
                        latencies.append((time.perf_counter() - t0) * 1000)
                        if problem:
                            errors.append(problem)

            await asyncio.gather(*(worker(c) for c in clients))

        if warmup:
            await run(warmup, False)
        # The load generator's own garbage collections (20-35 ms here) would stall every call in
        # flight and be charged to whichever server is being measured.
        gc.collect()
        gc.disable()
        t0 = time.perf_counter()
        try:
            await run(n, True)
        finally:
            gc.enable()
        seconds = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return LoadResult(n, len(errors), seconds, latencies, errors[0] if errors else None)
