"""The load generator: N `tools/call` POSTs of `echo` at concurrency C, raw httpx.

Two kinds of client (`Client.era`):

- `modern`: 2026-07-28, stateless; every request carries `MCP-Protocol-Version`, `Mcp-Method`,
  `Mcp-Name` and the `_meta` the protocol requires, and is answered by one JSON body.
- `legacy`: a session client of the 2025 protocol, as the SDK's own client and most agents today
  speak it: `initialize` (the server may set `Mcp-Session-Id`), `notifications/initialized`, then
  requests in that session with ids counting up, answered as JSON or as an SSE stream (whichever
  the server sends), and `DELETE` of the session at the end.

Sessions are opened before the timed part and closed after it (see `drive`).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import ssl
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

PROTOCOL = "2026-07-28"
LEGACY_PROTOCOL = "2025-11-25"
CALL_ID_META = "bastion/call_id"
Era = Literal["modern", "legacy"]


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


@dataclass(frozen=True)
class Client:
    """How the load generator's agents speak (see the module's docstring)."""

    era: Era = "modern"
    call_ids: bool = False
    """Every call carries a new `_meta["bastion/call_id"]` (an idempotency key Bastion claims)."""
    vary: bool = False
    """Every call's arguments differ (a counter appended to the text)."""
    renew_every: int = 0
    """legacy: open a new session after this many calls of one agent (0: one session per segment);
    the old session is deleted, or every other time simply left, as clients that die leave theirs."""


MODERN = Client()
LEGACY = Client("legacy")


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


def legacy_headers(token: str | None) -> dict[str, str]:
    hdrs = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if token:
        hdrs["authorization"] = f"Bearer {token}"
    return hdrs


def answer_of(response: httpx.Response) -> dict[str, Any] | None:
    """The JSON-RPC answer in a response: its JSON body, or the answer among its SSE events."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.content.splitlines():
            if line.startswith(b"data:"):
                try:
                    msg = json.loads(line[5:])
                except ValueError:
                    continue
                if isinstance(msg, dict) and ("result" in msg or "error" in msg):
                    return msg
        return None
    try:
        msg = json.loads(response.content)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _check(response: httpx.Response) -> str | None:
    """Why a response is not a successful tool result, or None when it is."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    msg = answer_of(response)
    if msg is None:
        return f"no JSON-RPC answer: {response.text[:200]}"
    result = msg.get("result")
    if not isinstance(result, dict) or result.get("isError"):
        return f"not a successful result: {response.text[:200]}"
    return None


_LIMITS = httpx.Limits(max_connections=1, max_keepalive_connections=1)
_TLS = ssl.create_default_context()
"""Shared by every client (all plain http): a client builds a new one otherwise, at ~10 ms each."""
_serial = itertools.count(1)


class Agent:
    """One agent: its own client and keep-alive connection, and (legacy) its own session."""

    def __init__(self, url: str, token: str | None, arguments: dict[str, Any], client: Client) -> None:
        self.url = url
        self.token = token
        self.arguments = arguments
        self.client = client
        self.http = httpx.AsyncClient(limits=_LIMITS, timeout=30, verify=_TLS)
        self.session: str | None = None
        self.next_id = 1
        self.calls = 0
        self.renewals = 0
        self.headers = call_headers(token) if client.era == "modern" else legacy_headers(token)
        self._fixed = (
            call_body(arguments) if client.era == "modern" and not (client.call_ids or client.vary) else None
        )
        if client.era == "legacy" and not (client.call_ids or client.vary):
            rest = json.dumps(
                {"method": "tools/call", "params": {"name": "echo", "arguments": arguments}},
                separators=(",", ":"),
            )
            self._legacy_rest = b"," + rest[1:].encode()

    async def open(self) -> str | None:
        """Open a legacy session (nothing for a modern client); a problem, or None."""
        if self.client.era != "legacy":
            return None
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LEGACY_PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        }
        base = legacy_headers(self.token)
        response = await self.http.post(self.url, content=json.dumps(init).encode(), headers=base)
        msg = answer_of(response) if response.status_code == 200 else None
        if msg is None or "result" not in msg:
            return f"initialize: HTTP {response.status_code}: {response.text[:200]}"
        self.session = response.headers.get("mcp-session-id")
        version = str(msg["result"].get("protocolVersion", LEGACY_PROTOCOL))
        self.headers = {**base, "mcp-protocol-version": version}
        if self.session:
            self.headers["mcp-session-id"] = self.session
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        response = await self.http.post(self.url, content=note, headers=self.headers)
        if response.status_code not in (200, 202):
            return f"notifications/initialized: HTTP {response.status_code}: {response.text[:200]}"
        self.next_id = 1
        return None

    async def end_session(self, delete: bool = True) -> str | None:
        """Close the legacy session: DELETE it, or (`delete=False`) just forget it."""
        session, self.session = self.session, None
        if session is None or not delete:
            return None
        response = await self.http.delete(self.url, headers=self.headers)
        if response.status_code >= 400 and response.status_code != 405:
            return f"DELETE of the session: HTTP {response.status_code}: {response.text[:200]}"
        return None

    def body(self) -> bytes:
        if self._fixed is not None:
            return self._fixed
        c = self.client
        if c.era == "legacy" and not (c.call_ids or c.vary):
            msg_id, self.next_id = self.next_id, self.next_id + 1
            return b'{"jsonrpc":"2.0","id":%d' % msg_id + self._legacy_rest
        n = next(_serial)
        args = (
            {k: f"{v} {n}" if isinstance(v, str) else v for k, v in self.arguments.items()}
            if c.vary
            else self.arguments
        )
        params: dict[str, Any] = {"name": "echo", "arguments": args}
        if c.era == "modern":
            params["_meta"] = {
                "io.modelcontextprotocol/protocolVersion": PROTOCOL,
                "io.modelcontextprotocol/clientCapabilities": {},
            }
        if c.call_ids:
            params.setdefault("_meta", {})[CALL_ID_META] = f"bench-{n}-{time.monotonic_ns()}"
        msg_id = 1
        if c.era == "legacy":
            msg_id, self.next_id = self.next_id, self.next_id + 1
        msg = {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params}
        return json.dumps(msg, separators=(",", ":")).encode()

    async def call(self) -> str | None:
        """One `tools/call`; a problem, or None (legacy, `renew_every`: now and then a new session first)."""
        c = self.client
        if c.era == "legacy" and c.renew_every and self.calls and self.calls % c.renew_every == 0:
            self.renewals += 1
            problem = await self.end_session(delete=self.renewals % 2 == 0) or await self.open()
            if problem:
                return problem
        self.calls += 1
        response = await self.http.post(self.url, content=self.body(), headers=self.headers)
        return _check(response)

    async def aclose(self) -> None:
        await self.http.aclose()


async def drive(
    url: str,
    token: str | None,
    arguments: dict[str, Any],
    n: int,
    concurrency: int,
    warmup: int = 0,
    client: Client = MODERN,
    cpu: Callable[[], dict[str, float]] | None = None,
) -> LoadResult:
    """Send `warmup` uncounted calls, then `n` counted calls, `concurrency` in flight at a time.

    Each of the `concurrency` workers is one agent with its own client and keep-alive
    connection (and, for a legacy client, its own session, opened before and deleted after the
    calls, outside the timed part). (One shared `httpx.AsyncClient` would scan its whole pool on
    every request: measured here at ~1 ms of CPU per call at 16 connections, which would make the
    load generator, not the servers, the bottleneck.)

    `cpu`, when given, reads each process's CPU seconds: read just before and after the timed
    calls, its differences per call (and this process's own, as "load generator") are the
    result's `cpu_ms_per_call`.
    """
    latencies: list[float] = []
    errors: list[str] = []
    agents = [Agent(url, token, arguments, client) for _ in range(concurrency)]
    try:
        opened = await asyncio.gather(*(a.open() for a in agents))
        if problem := next((p for p in opened if p), None):
            return LoadResult(n, n, 0.0, [], problem)

        async def run(count: int, record: bool) -> None:
            remaining = count

            async def worker(agent: Agent) -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    t0 = time.perf_counter()
                    try:
                        problem = await agent.call()
                    except httpx.HTTPError as exc:
                        problem = f"{type(exc).__name__}: {exc}"
                    if record:
                        latencies.append((time.perf_counter() - t0) * 1000)
                        if problem:
                            errors.append(problem)
                    elif problem:
                        errors.append(f"warm-up: {problem}")

            await asyncio.gather(*(worker(a) for a in agents))

        if warmup:
            await run(warmup, False)
        # The load generator's own garbage collections (20-35 ms here) would stall every call in
        # flight and be charged to whichever server is being measured.
        gc.collect()
        gc.disable()
        before = cpu() if cpu else {}
        own, t0 = time.process_time(), time.perf_counter()
        try:
            await run(n, True)
        finally:
            gc.enable()
        seconds, own = time.perf_counter() - t0, time.process_time() - own
        spent = {k: v - before[k] for k, v in cpu().items()} if cpu else {}
        closed = await asyncio.gather(*(a.end_session() for a in agents))
        errors += [p for p in closed if p]
    finally:
        await asyncio.gather(*(a.aclose() for a in agents))
    per_call = {"load generator": own, **spent} if cpu else {}
    cpu_ms = {k: v / n * 1000 for k, v in per_call.items()} if n else {}
    return LoadResult(n, len(errors), seconds, latencies, errors[0] if errors else None, cpu_ms)
