"""Bastion as a fleet: N replicas behind HAProxy on one PostgreSQL, soaked with faults, and sized.

    python -m bench.fleet [--minutes M] [--replicas 3] [--concurrency C] [--work-dir DIR] [--no-write]
    python -m bench.fleet --capacity [--replicas 3] [--concurrency C] [--calls N] [--no-write]

**The soak** (`bench.fleet_infra` starts the processes): a private PostgreSQL 15 cluster (its own
directory and port, so the machine's shared cluster is never restarted) holding the audit store
and the state DB of every replica; one upstream (`bench.fleet_upstream`: the SDK's default
server, sessions and SSE, counting every execution by its `text`); N `bastion serve` replicas,
each with its own port and `audit.instance`, sharing the session secret, the audit HMAC and
signing keys, the approval-form key and the dev issuer's JWKS; HAProxy in front (round robin,
`/readyz` checked every second, `fall 2 rise 2`). For M minutes a mixed load goes through HAProxy:

- legacy-session MCP clients (`initialize`, ~20 `tools/call` on the session, `DELETE`), on the
  upstream entry with `protocol: legacy`, so every client session is an upstream session too and
  the call_id is derived from the session and the request id;
- 2026-07-28 stateless MCP clients, each call with `_meta["bastion/call_id"]`;
- HTTP tool calls (`POST /v1/tool-calls`) with a `call_id`; every 10th is sent again on purpose
  after its answer, to show that a repeated call_id does not run the tool twice;
- budgeted calls from one user (`metered-per-user`, limit 300 a day), paced to make about 1.6x
  the limit in attempts;
- calls held for approval, approved by an approver task through the admin API, then repeated.

Every failed call is retried with the same call_id (a legacy session call with the same request
id), as a client would. Midway, spaced out: kill -9 of one replica and its restart; `pg_ctl
restart -m fast`; SIGSTOP of another replica for longer than HAProxy's check, then SIGCONT.
Once a minute: RSS, open fds and PostgreSQL connections of each replica. Afterwards the
assertions (printed, and written to docs/scale.md): every acknowledged call has its final audit
record; `bastion audit verify` passes; the budget was spent exactly; no call ran twice; legacy
sessions carried on through other replicas; every failed call is counted and placed in a fault.

**--capacity**: governed calls/s of 2026-07-28 stateless `tools/call` of `echo` through HAProxy
at a fixed concurrency with 1, 2 and 3 replicas in rotation (the others disabled in HAProxy),
every answer checked; CPU per call of every process; PostgreSQL connections per replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import processes
from bench.fleet_infra import (
    APPROVER,
    BASTION,
    BUDGET_LIMIT,
    BUDGET_NAME,
    BUDGET_USER,
    SESSIONS_UPSTREAM,
    UPSTREAM,
    Fleet,
)
from bench.harness import git_revision, machine
from bench.load import (
    CALL_ID_META,
    LEGACY_PROTOCOL,
    MODERN,
    PROTOCOL,
    answer_of,
    call_headers,
    drive,
    legacy_headers,
)
from bench.report import replace_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "scale.md"
SOAK_BEGIN, SOAK_END = "<!-- bench-fleet:begin -->", "<!-- bench-fleet:end -->"
CAP_BEGIN, CAP_END = "<!-- bench-capacity:begin -->", "<!-- bench-capacity:end -->"
ACK = ("ok", "repeat", "denied", "held", "duplicate")
"""Outcomes a client can act on: a result, a repeat answered from the first call, a denial, a
held call, a duplicate refused. Each must have its final audit record."""
RECORD_STATUS = {
    "ok": "completed",
    "repeat": "duplicate",
    "denied": "denied",
    "held": "held",
    "duplicate": "duplicate",
}
SESSION_CALLS = 20
GRACE_S = 5.0
"""A failure this long after a fault's recovery is still put down to it (clients' retries, checks)."""
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
SAMPLE_EVERY_S = 60.0
DEV_USERS = ("dev-alice", "dev-carol", "dev-dave")
HAPROXY_LINE = re.compile(r"^\S+:\d+ \[[^\]]+\] bastion \S+/\S+ ")
"""A request line of HAProxy's log (`option httplog`), as opposed to its health-check messages."""


def say(msg: str) -> None:
    print(f"bench.fleet: {msg}", file=sys.stderr, flush=True)


# -- what the clients saw -----------------------------------------------------------------------


@dataclass
class Attempt:
    kind: str
    """legacy | modern | http | budget | wire | approve | init"""
    key: str
    """The logical call's key: its `text` argument (retries send the same)."""
    call_id: str | None
    try_no: int
    t: float
    """Seconds since the load started, when it was sent."""
    ms: float
    replica: str | None
    """Which replica answered (HAProxy's `X-Fleet-Replica`); None when HAProxy answered itself."""
    outcome: str
    """ok | repeat | denied | held | duplicate | unavailable | failed | session-lost"""
    detail: str = ""
    audit_id: str | None = None
    session: int | None = None
    purpose: str = ""
    """"resend": the deliberate repeat of a call that was answered (HTTP, every 10th; wire, some)."""


@dataclass
class Fault:
    name: str
    target: str
    start: float
    recovered: float = math.nan
    notes: list[str] = field(default_factory=list)


@dataclass
class Sample:
    t: float
    replica: str
    pid: int
    rss: int
    fds: int
    pg: int


@dataclass
class Journal:
    attempts: list[Attempt] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    transitions: list[tuple[float, str, str, str]] = field(default_factory=list)
    sessions: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    extra_requests: int = 0
    """Requests not in `attempts`: each session's `notifications/initialized` and `DELETE`."""
    haproxy_logged: int = 0
    """Requests HAProxy logged (health checks excluded)."""


def _replica(resp: httpx.Response | None) -> str | None:
    return None if resp is None else resp.headers.get("x-fleet-replica")


def classify_mcp(resp: httpx.Response, text: str) -> tuple[str, str, str | None]:
    """(outcome, detail, audit_id) of a `tools/call` answer."""
    if resp.status_code != 200:
        body = resp.text[:120].replace("\n", " ")
        if resp.status_code == 404 and "session" in body:
            return "session-lost", f"HTTP 404: {body}", None
        return "failed", f"HTTP {resp.status_code}: {body}", None
    msg = answer_of(resp)
    if msg is None:
        return "failed", f"no JSON-RPC answer: {resp.text[:120]}", None
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        return "failed", f"JSON-RPC {err.get('code')}: {str(err.get('message'))[:100]}", None
    result = msg.get("result")
    if not isinstance(result, dict):
        return "failed", "no result", None
    raw_meta = result.get("_meta")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    content = result.get("content") or [{}]
    said = str(content[0].get("text", "")) if isinstance(content[0], dict) else ""
    if "bastion/duplicate_of" in meta:
        return ("repeat" if not result.get("isError") else "duplicate"), said[:100], None
    if result.get("isError"):
        dec = meta.get("bastion/decision") or result.get("structuredContent") or {}
        if isinstance(dec, dict) and dec.get("decision") in ("deny", "approval_required"):
            reasons = dec.get("reasons") or [{}]
            policy = str(reasons[-1].get("policy", "")) if reasons else ""
            if dec["decision"] == "approval_required":
                return "held", policy, dec.get("audit_id")
            if policy.endswith("-unavailable"):
                return "unavailable", f"denied {policy}", dec.get("audit_id")
            return "denied", policy, dec.get("audit_id")
        return "failed", f"tool error: {said[:100]}", None
    if said != text:
        return "failed", f"wrong result {said[:60]!r} for {text!r}", None
    return "ok", "", None


def classify_http(resp: httpx.Response, text: str) -> tuple[str, str, str | None]:
    """(outcome, detail, audit_id) of a `POST /v1/tool-calls` answer."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return "failed", f"HTTP {resp.status_code}: {resp.text[:120]}", None
    audit_id = body.get("audit_id")
    code = resp.status_code
    if code == 200:
        result = body.get("result") or {}
        content = result.get("content") or [{}]
        said = str(content[0].get("text", "")) if isinstance(content[0], dict) else ""
        if result.get("isError") or said != text:
            return "failed", f"tool error or wrong result: {said[:80]}", audit_id
        return ("repeat" if body.get("duplicate_of") else "ok"), "", audit_id
    if code == 202:
        return "held", str(body.get("approval_id")), audit_id
    if code == 409:
        return "duplicate", str(body.get("message", ""))[:100], audit_id
    if code in (403, 429):
        reasons = body.get("reasons") or [{}]
        policy = str(reasons[-1].get("policy", ""))
        if policy.endswith("-unavailable"):
            return "unavailable", f"{code} {policy}", audit_id
        return "denied", policy, audit_id
    err = body.get("error")
    what = err.get("error") if isinstance(err, dict) else err
    said = what or body.get("message") or json.dumps(body, separators=(",", ":"))
    return "failed", f"HTTP {code}: {said}"[:140], audit_id


def mcp_body(text: str, msg_id: int, call_id: str | None, modern: bool, tool: str = "echo") -> bytes:
    params: dict[str, Any] = {"name": tool, "arguments": {"text": text}}
    meta: dict[str, Any] = {}
    if modern:
        meta |= {
            "io.modelcontextprotocol/protocolVersion": PROTOCOL,
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    if call_id is not None:
        meta[CALL_ID_META] = call_id
    if meta:
        params["_meta"] = meta
    msg = {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params}
    return json.dumps(msg, separators=(",", ":")).encode()


def derived_call_id(session_id: str, msg_id: int) -> str:
    """The call_id Bastion derives for a legacy session's request (gateway/fronts/mcp/exchange.py)."""
    return f"s-{hashlib.sha256(session_id.encode()).hexdigest()[:24]}-{msg_id}"


# -- the soak's load ----------------------------------------------------------------------------


class Soak:
    def __init__(self, fleet: Fleet, seconds: float, concurrency: int) -> None:
        self.fleet = fleet
        self.url = fleet.url
        self.seconds = seconds
        self.concurrency = concurrency
        self.j = Journal()
        self.t0 = 0.0
        self.stop_at = 0.0
        key = fleet.key
        self.tokens = {u: key.mint(u, audience=self.url, groups=["developers"]) for u in DEV_USERS}
        self.budget_token = key.mint(BUDGET_USER, audience=self.url, groups=["developers"])
        self.wire_token = key.mint("dev-erin", audience=self.url, groups=["developers"])
        self.admin_token = key.mint(APPROVER, audience=self.url, groups=["admins"])
        self.serial = itertools.count(1)
        self.session_serial = itertools.count(1)
        self.approvals: asyncio.Queue[tuple[str, asyncio.Event]] = asyncio.Queue()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    @staticmethod
    def client() -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        return httpx.AsyncClient(limits=limits, timeout=30)

    async def send(
        self,
        http: httpx.AsyncClient,
        kind: str,
        key: str,
        call_id: str | None,
        try_no: int,
        request: Callable[[], Any],
        classify: Callable[[httpx.Response], tuple[str, str, str | None]],
        session: int | None = None,
        purpose: str = "",
    ) -> tuple[Attempt, httpx.Response | None]:
        t = self.now()
        t0 = time.perf_counter()
        resp: httpx.Response | None = None
        try:
            resp = await request()
            outcome, detail, audit_id = classify(resp)
        except httpx.HTTPError as exc:
            outcome, detail, audit_id = "failed", f"{type(exc).__name__}: {str(exc)[:100]}", None
        ms = (time.perf_counter() - t0) * 1000
        a = Attempt(
            kind, key, call_id, try_no, t, ms, _replica(resp), outcome, detail, audit_id, session, purpose
        )
        self.j.attempts.append(a)
        return a, resp

    async def with_retries(self, once: Callable[[int], Any]) -> Attempt:
        """`once(try_no)` until its outcome is not a failure (or the retries are spent)."""
        a: Attempt = await once(0)
        for n, delay in enumerate(RETRY_DELAYS, 1):
            if a.outcome not in ("failed", "unavailable"):
                break
            await asyncio.sleep(delay)
            a = await once(n)
        return a

    # legacy sessions ----------------------------------------------------------------------------

    async def legacy_worker(self, w: int) -> None:
        url = f"{self.url}/mcp/{SESSIONS_UPSTREAM}"
        token = self.tokens[DEV_USERS[w % len(DEV_USERS)]]
        async with self.client() as http:
            while self.running():
                await self.legacy_session(http, url, token, w)

    async def legacy_session(self, http: httpx.AsyncClient, url: str, token: str, w: int) -> None:
        """One session: `initialize`, up to `SESSION_CALLS` calls (each retried with its request id
        on failure, as the same call), `DELETE`."""
        sid = next(self.session_serial)
        info: dict[str, Any] = {"worker": w, "opened": self.now(), "init_replica": None, "calls": 0}
        self.j.sessions[sid] = info
        base = legacy_headers(token)
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": LEGACY_PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "bench-fleet", "version": "1"},
            },
        }

        def init_ok(resp: httpx.Response) -> tuple[str, str, str | None]:
            msg = answer_of(resp) if resp.status_code == 200 else None
            if msg is None or "result" not in msg or not resp.headers.get("mcp-session-id"):
                return "failed", f"initialize: HTTP {resp.status_code}: {resp.text[:100]}", None
            return "ok", "", None

        a, resp = await self.send(
            http, "init", f"S{sid}", None, 0,
            lambda: http.post(url, content=json.dumps(init).encode(), headers=base),
            init_ok, sid,
        )  # fmt: skip
        if a.outcome != "ok" or resp is None:
            info["failed_open"] = a.detail
            await asyncio.sleep(0.5)
            return
        session_id = resp.headers["mcp-session-id"]
        info["init_replica"] = a.replica
        info["session_id"] = session_id
        result = (answer_of(resp) or {}).get("result", {})
        version = str(result.get("protocolVersion", LEGACY_PROTOCOL))
        headers = {**base, "mcp-protocol-version": version, "mcp-session-id": session_id}
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        self.j.extra_requests += 1
        with contextlib.suppress(httpx.HTTPError):
            await http.post(url, content=note, headers=headers)
        for msg_id in range(1, SESSION_CALLS + 1):
            if not self.running():
                break
            text = f"L{sid}-{msg_id}"
            call_id = derived_call_id(session_id, msg_id)
            body = mcp_body(text, msg_id, None, modern=False)

            async def once(n: int, body: bytes = body, text: str = text, call_id: str = call_id) -> Attempt:
                a, _ = await self.send(
                    http, "legacy", text, call_id, n,
                    lambda: http.post(url, content=body, headers=headers),
                    lambda r: classify_mcp(r, text), sid,
                )  # fmt: skip
                return a

            await self.with_retries(once)
            info["calls"] += 1
        self.j.extra_requests += 1
        with contextlib.suppress(httpx.HTTPError):
            await http.delete(url, headers=headers)
        info["closed"] = self.now()

    # 2026-07-28 stateless clients ---------------------------------------------------------------

    async def modern_worker(self, w: int) -> None:
        url = f"{self.url}/mcp/{UPSTREAM}"
        headers = call_headers(self.tokens[DEV_USERS[w % len(DEV_USERS)]])
        async with self.client() as http:
            while self.running():
                n = next(self.serial)
                text, call_id = f"M{n}", f"m-{n}"
                body = mcp_body(text, 1, call_id, modern=True)

                async def once(
                    k: int, body: bytes = body, text: str = text, call_id: str = call_id
                ) -> Attempt:
                    a, _ = await self.send(
                        http, "modern", text, call_id, k,
                        lambda: http.post(url, content=body, headers=headers),
                        lambda r: classify_mcp(r, text),
                    )  # fmt: skip
                    return a

                await self.with_retries(once)

    # the HTTP tool API --------------------------------------------------------------------------

    async def http_call(
        self,
        http: httpx.AsyncClient,
        kind: str,
        token: str,
        tool: str,
        text: str,
        call_id: str,
        purpose: str = "",
    ) -> Attempt:
        url = f"{self.url}/v1/tool-calls"
        body = {"upstream": UPSTREAM, "tool": tool, "arguments": {"text": text}, "call_id": call_id}
        headers = {"authorization": f"Bearer {token}"}

        async def once(k: int) -> Attempt:
            a, _ = await self.send(
                http, kind, text, call_id, k,
                lambda: http.post(url, json=body, headers=headers),
                lambda r: classify_http(r, text), purpose=purpose,
            )  # fmt: skip
            return a

        return await self.with_retries(once)

    async def http_worker(self, w: int) -> None:
        token = self.tokens[DEV_USERS[w % len(DEV_USERS)]]
        async with self.client() as http:
            while self.running():
                n = next(self.serial)
                text, call_id = f"H{n}", f"h-{n}"
                a = await self.http_call(http, "http", token, "echo", text, call_id)
                if n % 10 == 0 and a.outcome == "ok":
                    await self.http_call(http, "http", token, "echo", text, call_id, "resend")

    # the budget ---------------------------------------------------------------------------------

    async def budget_worker(self, w: int, every_s: float) -> None:
        await asyncio.sleep(every_s * w / 2)
        async with self.client() as http:
            while self.running():
                t_next = time.monotonic() + every_s
                n = next(self.serial)
                text, call_id = f"B{n}", f"b-{n}"
                a = await self.http_call(http, "budget", self.budget_token, "metered", text, call_id)
                if n % 10 == 0 and a.outcome == "ok":
                    # as a client that lost the answer: the same call_id again (must not run twice)
                    await self.http_call(
                        http, "budget", self.budget_token, "metered", text, call_id, "resend"
                    )
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    # approvals ----------------------------------------------------------------------------------

    async def wire_worker(self, every_s: float) -> None:
        async with self.client() as http:
            while self.running():
                t_next = time.monotonic() + every_s
                n = next(self.serial)
                text, call_id = f"W{n}", f"w-{n}"
                a = await self.http_call(http, "wire", self.wire_token, "wire", text, call_id)
                if a.outcome == "held":
                    approved = asyncio.Event()
                    await self.approvals.put((a.detail, approved))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(approved.wait(), 60)
                    # the same call again: it runs once, on whichever replica takes it
                    a = await self.http_call(http, "wire", self.wire_token, "wire", text, call_id)
                    if n % 5 == 0 and a.outcome == "ok":
                        # as a client that lost the answer: the same call and call_id once more
                        await self.http_call(http, "wire", self.wire_token, "wire", text, call_id, "resend")
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def approver(self) -> None:
        headers = {"authorization": f"Bearer {self.admin_token}"}
        async with self.client() as http:
            while True:
                approval_id, done = await self.approvals.get()
                url = f"{self.url}/v1/approvals/{approval_id}/approve"

                def decided(resp: httpx.Response) -> tuple[str, str, str | None]:
                    if resp.status_code == 200:
                        return "ok", "", None
                    if resp.status_code == 409:
                        return "duplicate", resp.text[:100], None
                    return "failed", f"HTTP {resp.status_code}: {resp.text[:100]}", None

                async def once(k: int, url: str = url, approval_id: str = approval_id) -> Attempt:
                    a, _ = await self.send(
                        http, "approve", approval_id, approval_id, k,
                        lambda: http.post(url, json={"reason": "bench.fleet soak"}, headers=headers),
                        decided,
                    )  # fmt: skip
                    return a

                await self.with_retries(once)
                done.set()

    # faults, samples, HAProxy's view ------------------------------------------------------------

    async def faults(self) -> None:
        fleet = self.fleet
        names = list(fleet.replicas)
        killed = names[0]
        paused = names[1 % len(names)]
        plan = [(0.25, "kill"), (0.5, "pg"), (0.75, "stop")]
        for frac, what in plan:
            # 10 s past the quarter: clear of the once-a-minute samples
            await asyncio.sleep(max(0.0, self.seconds * frac + 10 - self.now()))
            if not self.running():
                return
            if what == "kill":
                rep = fleet.replicas[killed]
                f = Fault("kill -9, restart", killed, self.now())
                self.j.faults.append(f)
                say(f"fault: kill -9 {killed} (pid {rep.pid})")
                rep.child.kill9()
                await asyncio.sleep(3.0)
                rep.restart()
                f.notes.append(f"restarted as pid {rep.pid} {self.now() - f.start:.1f} s after the kill")
                await self._ready(rep.base)
                f.notes.append(f"/readyz 200 again {self.now() - f.start:.1f} s after the kill")
            elif what == "pg":
                f = Fault("PostgreSQL restart (-m fast)", "postgres", self.now())
                self.j.faults.append(f)
                say("fault: pg_ctl restart -m fast")
                t = time.perf_counter()
                assert fleet.pg is not None
                await asyncio.to_thread(fleet.pg.restart)
                f.notes.append(f"pg_ctl restart took {time.perf_counter() - t:.1f} s")
            else:
                rep = fleet.replicas[paused]
                f = Fault("SIGSTOP 6 s, SIGCONT", paused, self.now())
                self.j.faults.append(f)
                say(f"fault: SIGSTOP {paused} for 6 s")
                rep.child.signal(signal.SIGSTOP)
                await asyncio.sleep(6.0)
                rep.child.signal(signal.SIGCONT)
                f.notes.append("SIGCONT after 6.0 s")
            await self._all_up()
            f.recovered = self.now()
            say(f"recovered after {f.recovered - f.start:.1f} s")

    async def _ready(self, base: str) -> None:
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{base}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)

    async def _all_up(self) -> None:
        hap = self.fleet.haproxy
        assert hap is not None
        while True:
            states = await asyncio.to_thread(hap.states)
            if states and all(s == "UP" for s in states.values()):
                return
            await asyncio.sleep(0.25)

    async def watch_haproxy(self) -> None:
        hap = self.fleet.haproxy
        assert hap is not None
        last: dict[str, str] = {}
        while True:
            try:
                states = await asyncio.to_thread(hap.states)
            except OSError:
                states = {}
            for name, state in states.items():
                if last.get(name) != state:
                    self.j.transitions.append((self.now(), name, last.get(name, ""), state))
                    last[name] = state
            await asyncio.sleep(0.25)

    async def sampler(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(SAMPLE_EVERY_S)

    def sample(self) -> None:
        assert self.fleet.pg is not None
        conns = pg_connections(self.fleet.pg.port, {n: r.pid for n, r in self.fleet.replicas.items()})
        t = self.now()
        for name, rep in self.fleet.replicas.items():
            self.j.samples.append(
                Sample(t, name, rep.pid, processes.rss_bytes(rep.pid), fd_count(rep.pid), conns[name])
            )

    async def run(self) -> Journal:
        # the load generator's own garbage collections would stall every call in flight
        gc.collect()
        gc.freeze()
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + self.seconds
        c = self.concurrency
        n_legacy, n_modern = max(1, c // 3), max(1, c // 3)
        n_http = max(1, c - n_legacy - n_modern)
        budget_every = 2 * self.seconds / (1.6 * BUDGET_LIMIT)
        load = [
            *(self.legacy_worker(w) for w in range(n_legacy)),
            *(self.modern_worker(w) for w in range(n_modern)),
            *(self.http_worker(w) for w in range(n_http)),
            self.budget_worker(0, budget_every),
            self.budget_worker(1, budget_every),
            self.wire_worker(3.0),
        ]
        say(
            f"load for {self.seconds / 60:.1f} min: {n_legacy} legacy-session, {n_modern} 2026-07-28, "
            f"{n_http} HTTP API clients; 2 budget clients (one call each every {budget_every:.2f} s), "
            "1 approval client (every 3 s) and its approver"
        )
        side = [
            asyncio.create_task(x)
            for x in (self.approver(), self.sampler(), self.watch_haproxy(), self.faults())
        ]
        progress = asyncio.create_task(self.progress())
        try:
            await asyncio.gather(*load)
        finally:
            for task in (*side, progress):
                task.cancel()
            await asyncio.gather(*side, progress, return_exceptions=True)
            gc.unfreeze()
        await asyncio.to_thread(self.sample)
        self.j.seconds = self.now()
        return self.j

    async def progress(self) -> None:
        seen = 0
        while True:
            await asyncio.sleep(30)
            new = self.j.attempts[seen:]
            seen += len(new)
            bad = sum(a.outcome in ("failed", "unavailable", "session-lost") for a in new)
            say(f"t={self.now():.0f} s: {len(new)} requests in the last 30 s, {bad} failed")


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    out.add(target[8:-1])
    except OSError:
        pass
    return out


def pg_connections(pg_port: int, pids: dict[str, int]) -> dict[str, int]:
    """TCP connections from each process to PostgreSQL's port: the process's socket inodes
    (`/proc/<pid>/fd`) matched with `/proc/net/tcp` entries whose remote port is PostgreSQL's."""
    to_pg: set[str] = set()
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        cols = line.split()
        if len(cols) > 9 and int(cols[2].split(":")[1], 16) == pg_port and cols[3] == "01":  # ESTABLISHED
            to_pg.add(cols[9])
    return {name: len(_socket_inodes(pid) & to_pg) for name, pid in pids.items()}


# -- after the soak: the checks -----------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    lines: list[str]


@dataclass
class SoakResult:
    command: str
    started: str
    minutes: float
    replicas: int
    concurrency: int
    journal: Journal
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """Calls that failed, grouped and placed in their fault (or outside every fault)."""
    table: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    startup: list[str] = field(default_factory=list)
    seconds: float = 0.0
    revision: str = ""
    """The code's revision when the run started (the replicas run what was on disk then)."""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


async def audit_rows(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            'SELECT id, call_id, instance, status, effect, "user", tool, action, seq, record '
            "FROM audit_records"
        )
    finally:
        await conn.close()
    out = []
    for r in rows:
        rec = json.loads(r["record"])
        reasons = (rec.get("decision") or {}).get("reasons") or []
        out.append(
            {
                "id": r["id"],
                "call_id": r["call_id"],
                "instance": r["instance"],
                "status": r["status"],
                "effect": r["effect"],
                "user": r["user"],
                "tool": r["tool"],
                "action": r["action"],
                "seq": r["seq"],
                "policies": [x.get("policy") for x in reasons],
                "stage": (rec.get("decision") or {}).get("stage"),
                "ts": rec.get("ts"),
                "charged": [
                    int(c["used"])
                    for c in ((rec.get("budget") or {}).get("charged") or [])
                    if isinstance(c, dict) and isinstance(c.get("used"), int) and not c.get("refunded")
                ],
                "refunded": sum(
                    1
                    for c in ((rec.get("budget") or {}).get("charged") or [])
                    if isinstance(c, dict) and c.get("refunded")
                ),
                "text": (
                    (rec.get("args_redacted") or {}) if isinstance(rec.get("args_redacted"), dict) else {}
                ).get("text"),
            }
        )
    return out


async def budget_rows(dsn: str) -> list[tuple[str, str, int, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT budget, subject, window_start, used FROM bastion_budget_usage")
    finally:
        await conn.close()
    return [(r["budget"], r["subject"], r["window_start"], r["used"]) for r in rows]


def in_fault(t: float, faults: list[Fault]) -> Fault | None:
    for f in faults:
        end = (f.recovered if not math.isnan(f.recovered) else f.start + 60) + GRACE_S
        if f.start - 0.5 <= t <= end:
            return f
    return None


def _pct(data: list[float], p: float) -> float:
    if not data:
        return math.nan
    s = sorted(data)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def analyse(r: SoakResult, fleet: Fleet, executions: dict[str, int], rows: list[dict[str, Any]],
            budgets: list[tuple[str, str, int, int]], verify: tuple[int, str]) -> None:  # fmt: skip
    j = r.journal
    calls = [a for a in j.attempts if a.kind in ("legacy", "modern", "http", "budget", "wire")]
    by_id = {row["id"]: row for row in rows}
    by_call: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["call_id"]:
            by_call[row["call_id"]].append(row)

    # 1. every acknowledged call has its final record ----------------------------------------
    acked = [a for a in j.attempts if a.outcome in ACK and a.kind != "init"]
    missing: list[str] = []
    kinds: Counter[str] = Counter()
    for a in acked:
        kinds[a.kind] += 1
        if a.kind == "approve":
            want = "approved"
            found = any(x["action"] == "approve" and x["status"] == want for x in by_call.get(a.key, []))
            if a.outcome == "duplicate":
                found = bool(by_call.get(a.key))
        elif a.audit_id is not None:
            rec = by_id.get(a.audit_id)
            found = rec is not None and rec["status"] == RECORD_STATUS[a.outcome]
        else:
            want = RECORD_STATUS[a.outcome]
            found = any(x["status"] == want for x in by_call.get(a.call_id or "", []))
        if not found:
            missing.append(f"{a.kind} {a.key} ({a.outcome}, call_id {a.call_id}, audit_id {a.audit_id})")
    pending = [row for row in rows if row["status"] == "pending"]
    by_cid: dict[str, list[Attempt]] = defaultdict(list)
    for a in j.attempts:
        if a.call_id:
            by_cid[a.call_id].append(a)
    pending_acked = 0
    pending_lines = []
    for row in pending:
        seen = by_cid.get(row["call_id"] or "", [])
        pending_acked += any(a.outcome in ACK and a.audit_id == row["id"] for a in seen)
        ran_n = executions.get(f"{row['tool']} {row['text']}", 0)
        pending_lines.append(
            f"pending: record {row['id']} of {row['instance']}, {row['tool']} call_id {row['call_id']}; "
            f"ran {ran_n} time(s) at the upstream; the client saw: "
            + "; ".join(f"try {a.try_no}: {a.outcome} {a.detail[:70]} ({a.replica})" for a in seen)
        )
    lines = [
        f"{len(acked):,} acknowledged answers ({', '.join(f'{k} {n:,}' for k, n in sorted(kinds.items()))}); "
        f"{len(acked) - len(missing):,} have their final audit record (looked up by the answer's "
        "`audit_id`, else by call_id and the status the answer implies); "
        f"{len(missing)} missing",
        f"records still `pending` after every replica stopped cleanly: {len(pending)} (the record an "
        f"acknowledged answer named: {pending_acked})",
        *(f"MISSING: {m}" for m in missing[:20]),
        *pending_lines[:10],
    ]
    r.checks.append(
        Check("every acknowledged call has its final audit record", not missing and not pending_acked, lines)
    )

    # 2. every chain verifies ---------------------------------------------------------------
    code, out = verify
    chains = Counter(row["instance"] for row in rows if row["seq"] is not None)
    r.checks.append(
        Check(
            "`bastion audit verify` passes for every instance's chain",
            code == 0,
            [
                f"exit {code}; chained records per instance: "
                + ", ".join(f"{k} {v:,}" for k, v in sorted(chains.items())),
                *[ln for ln in out.strip().splitlines()[:12]],
            ],
        )
    )

    # 3. the budget: never overspent, and exact ------------------------------------------------
    mine = [
        x for x in rows if x["user"] == BUDGET_USER and x["tool"] == "metered" and x["action"] == "call_tool"
    ]
    allowed = [x for x in mine if x["effect"] == "allow" and x["status"] != "duplicate"]
    dups = [x for x in mine if x["effect"] == "allow" and x["status"] == "duplicate"]
    over = [x for x in mine if f"budget/{BUDGET_NAME}" in x["policies"]]
    refused_other = [x for x in mine if x["effect"] != "allow" and x not in over]
    used = sum(u for b, _, _, u in budgets if b == BUDGET_NAME)
    windows = {w for b, _, w, _ in budgets if b == BUDGET_NAME}
    limit = BUDGET_LIMIT * max(1, len(windows))
    b_attempts = [a for a in j.attempts if a.kind == "budget"]
    logical = {a.key for a in b_attempts}
    unavailable = [a for a in b_attempts if a.outcome == "unavailable"]
    decided = len(allowed) + len(over)
    ran = sum(n for k, n in executions.items() if k.startswith("metered "))
    ok_answers = len({a.key for a in b_attempts if a.outcome == "ok"})
    r.checks.append(
        Check(
            "the budget is never overspent",
            used <= limit and len(allowed) <= limit and ran <= limit,
            [
                f"limit {BUDGET_LIMIT} a day for {BUDGET_USER} ({len(windows)} window(s)): counter in the "
                f"state DB {used}; calls allowed (non-duplicate `allow` records) {len(allowed)}; "
                f"executions of `metered` at the upstream {ran}; all ≤ {limit}"
            ],
        )
    )
    lost = used - len(allowed)
    r.checks.append(
        Check(
            "the budget is exact: allowed == min(limit, attempts decided), counter == allowed",
            len(allowed) == min(limit, decided) and lost == 0,
            [
                f"{len(logical)} logical calls ({len(b_attempts)} requests with retries and repeats); "
                f"requests the budget stage decided (on record): {decided} = {len(allowed)} allowed + "
                f"{len(over)} refused `budget/{BUDGET_NAME}`; allowed == min(limit, decided): "
                f"{len(allowed)} == min({limit}, {decided}): {len(allowed) == min(limit, decided)}",
                f"counter - allowed = {used} - {len(allowed)} = {lost} unit(s) charged to calls that did "
                f"not run; repeated call_ids answered `duplicate` (`allow` records with status "
                f"`duplicate`, each charged and then, unless Bastion failed to, refunded): {len(dups)}; "
                f"requests refused `audit-unavailable` (no record: the store was down): {len(unavailable)}",
                f"the tool ran {ran} times; {ok_answers} logical calls answered with a result; refused "
                f"before the budget stage: {len(refused_other)}",
                _counter_values(allowed + dups),
            ],
        )
    )

    # 4. no call ran twice -------------------------------------------------------------------
    twice = {k: n for k, n in executions.items() if n > 1}
    ok_keys = {(a.kind, a.key) for a in calls if a.outcome in ("ok", "repeat")}
    tool_of = {"legacy": "echo", "modern": "echo", "http": "echo", "budget": "metered", "wire": "wire"}
    not_run = [f"{k} {key}" for k, key in ok_keys if executions.get(f"{tool_of[k]} {key}", 0) != 1]
    resent = [a for a in calls if a.purpose == "resend"]
    retried = {(a.kind, a.key) for a in calls if a.try_no > 0}
    r.checks.append(
        Check(
            "no call ran twice (upstream execution counts per call key)",
            not twice and not not_run,
            [
                f"{sum(executions.values()):,} executions at the upstream of {len(executions):,} "
                "distinct keys; "
                f"keys run more than once: {len(twice)}; answered calls not run exactly once: {len(not_run)}",
                f"calls retried after a failure with the same call_id: {len(retried)}; deliberate repeats of "
                f"answered calls: {len(resent)} ("
                + ", ".join(
                    f"{o} {n}" for o, n in sorted(Counter(f"{a.kind}:{a.outcome}" for a in resent).items())
                )
                + ")",
                *(f"TWICE: {k} ran {n} times" for k, n in list(twice.items())[:10]),
                *(f"NOT RUN ONCE: {k}" for k in not_run[:10]),
            ],
        )
    )

    # 5. legacy sessions across replicas -----------------------------------------------------
    legacy = [a for a in j.attempts if a.kind == "legacy"]
    instances_of: dict[int, set[str]] = defaultdict(set)
    for a in legacy:
        for row in by_call.get(a.call_id or "", []):
            if row["status"] in ("completed", "duplicate") and a.session is not None:
                instances_of[a.session].add(row["instance"])
    opened = {sid: s for sid, s in j.sessions.items() if s.get("session_id")}
    multi = sum(len(v) >= 2 for v in instances_of.values())
    per_session: dict[int, list[Attempt]] = defaultdict(list)
    for a in legacy:
        if a.session is not None:
            per_session[a.session].append(a)
    hit, carried, broken, lost = 0, 0, [], 0
    for sid, atts in per_session.items():
        bad = [a for a in atts if a.outcome in ("failed", "unavailable", "session-lost")]
        lost += sum(a.outcome == "session-lost" for a in atts)
        if not bad:
            continue
        hit += 1
        first_bad = min(a.t for a in bad)
        fault = in_fault(first_bad, j.faults)
        # broken: a later call (another request id, not the retry of the one cut off) that did not
        # succeed, or any call told that the session is unknown
        later = [a for a in atts if a.t > first_bad and a.key != bad[0].key and a.try_no == 0]
        if any(a.outcome not in ACK for a in later) or any(a.outcome == "session-lost" for a in atts):
            broken.append(
                f"session {sid}: " + "; ".join(f"{a.key} {a.outcome} {a.detail[:60]}" for a in bad[:3])
            )
        elif later and fault is not None:
            carried += 1
    around: list[str] = []
    for f in j.faults:
        if not f.target.startswith("replica"):
            continue
        spanning = [sid for sid, s in opened.items() if s["opened"] < f.start < s.get("closed", math.inf)]
        homed = [sid for sid in spanning if opened[sid].get("init_replica") == f.target]
        served_before = [
            sid for sid in spanning if any(a.replica == f.target and a.t < f.start for a in per_session[sid])
        ]
        moved = [
            sid
            for sid in served_before
            if any(a.t >= f.start and a.outcome in ACK and a.replica != f.target for a in per_session[sid])
        ]
        whole = [
            sid
            for sid in spanning
            if all(a.outcome in ACK for a in per_session[sid] if a.t >= f.start and a.try_no == 0)
        ]
        around.append(
            f"{f.name} of {f.target}: {len(spanning)} sessions open at that moment ({len(homed)} initialized "
            f"on {f.target}; {len(served_before)} had calls answered by {f.target} before); "
            f"{len(moved)} of those went on with calls answered by another replica; "
            f"{len(whole)} of the {len(spanning)} had every later first attempt answered"
        )
    r.checks.append(
        Check(
            "legacy sessions carry on through another replica",
            not broken and lost == 0,
            [
                f"{len(opened)} sessions opened ({sum(s['calls'] for s in opened.values()):,} calls); "
                f"{multi} had calls answered by two or more instances (audit `instance` by derived call_id; "
                "HAProxy balances each request, so nearly every session moves between replicas)",
                *around,
                f"sessions with a failed call: {hit}; of them {carried} went on with every later call "
                "answered (through the replicas that were up); broken beyond the call in flight: "
                f"{len(broken)}; "
                f"calls answered 404 unknown session: {lost}",
                *(f"BROKEN: {b}" for b in broken[:10]),
            ],
        )
    )

    # 6. failures, placed in their fault -----------------------------------------------------
    failed = [a for a in j.attempts if a.outcome in ("failed", "unavailable", "session-lost")]
    outside = [a for a in failed if in_fault(a.t, j.faults) is None]
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    for a in failed:
        hit_fault = in_fault(a.t, j.faults)
        where = f"{hit_fault.name} ({hit_fault.target})" if hit_fault else "outside every fault"
        groups[where][f"{a.kind}: {a.detail[:90]}"] += 1
    final_fail = []
    by_key: dict[tuple[str, str], list[Attempt]] = defaultdict(list)
    for a in j.attempts:
        by_key[(a.kind, a.key)].append(a)
    for (kind, key), atts in by_key.items():
        if kind in ("init",):
            continue
        if all(a.outcome not in ACK for a in atts):
            final_fail.append((kind, key, atts[-1]))
    for where, counts in groups.items():
        r.failures.append(f"{where}: {sum(counts.values())} failed requests")
        r.failures += [f"  {n} x {what}" for what, n in counts.most_common(20)]
    # what the retry of each failed request found: the tool had not run (it runs now), or had
    # run (the repeat is answered from the first call, or refused as a duplicate)
    after: Counter[str] = Counter()
    for atts in by_key.values():
        for prev, nxt in itertools.pairwise(atts):
            if prev.outcome in ("failed", "unavailable") and nxt.try_no == prev.try_no + 1:
                after[nxt.outcome] += 1
    if after:
        r.failures.append(
            "the retry (same call_id) of a failed request was answered: "
            + ", ".join(f"{k} {n}" for k, n in sorted(after.items()))
            + " (`ok`: the first attempt had not run; `repeat`/`duplicate`: it had, and did not run again)"
        )
    slow = [a for a in j.attempts if a.outcome in ACK and a.ms > 5000]
    if slow:
        where_slow = Counter(
            f"{a.replica} during {flt.name} of {flt.target}"
            if (flt := in_fault(a.t, j.faults))
            else f"{a.replica}"
            for a in slow
        )
        r.failures.append(
            f"answered, but after more than 5 s: {len(slow)} ("
            + ", ".join(f"{n} on {k}" for k, n in where_slow.most_common())
            + "; HAProxy does not cut requests in flight to a replica it marks down, they wait for it)"
        )
    sent = len(j.attempts) + j.extra_requests
    r.failures.append(
        f"requests sent {sent:,}, requests in HAProxy's log {j.haproxy_logged:,}: {sent - j.haproxy_logged} "
        "never reached HAProxy's request processing (a keep-alive connection HAProxy closed just as the "
        "client reused it: `Server disconnected without sending a response`)"
    )
    gave_up = Counter(kind for kind, _, _ in final_fail)
    tool_of2 = {"legacy": "echo", "modern": "echo", "http": "echo", "budget": "metered", "wire": "wire"}
    gave_up_ran = sum(
        1
        for kind, key, _ in final_fail
        if kind in tool_of2 and executions.get(f"{tool_of2[kind]} {key}", 0) >= 1
    )
    r.checks.append(
        Check(
            "every failed request is counted and falls in a fault window",
            not outside,
            [
                f"{len(failed)} failed requests of {len(j.attempts):,}; {len(outside)} outside every fault "
                f"window (fault start to recovery + {GRACE_S:.0f} s)",
                f"logical calls never acknowledged after all retries: {len(final_fail)} "
                f"({', '.join(f'{k} {n}' for k, n in sorted(gave_up.items())) or 'none'}); "
                f"of them {gave_up_ran} had reached the tool (each has an `interrupted` or `failed` record)",
                *(f"OUTSIDE: t={a.t:.1f} s {a.kind} {a.key} {a.detail[:100]}" for a in outside[:10]),
            ],
        )
    )
    _table(r, fleet)


def _counter_values(charged: list[dict[str, Any]]) -> str:
    """What the counter said after each charge that stayed (the record's `budget.charged[].used`,
    refunded charges left out: their unit is given again): each value from 1 up should appear once;
    one seen twice is a charge that did not stay, one missing a charge with no record."""
    seen: Counter[int] = Counter(v for x in charged for v in x["charged"])
    refunded = sum(x["refunded"] for x in charged)
    if not seen:
        return "the records carry no counter values"
    top = max(seen)
    twice = sorted(v for v, n in seen.items() if n > 1)
    gaps = sorted(set(range(1, top + 1)) - set(seen))
    when = {v: sorted(str(x["ts"]) for x in charged if v in x["charged"]) for v in twice[:5]}
    return (
        "counter values the allowed records were charged at (`budget.charged[].used`): "
        f"{len(seen)} distinct, 1..{top}; given to two or more records: {twice[:20] or 'none'}"
        + (f" (at {when})" if when else "")
        + f"; never given: {gaps[:20] or 'none'}; charges refunded (marked `refunded`): {refunded}"
    )


def _table(r: SoakResult, fleet: Fleet) -> None:
    j = r.journal
    calls = [a for a in j.attempts if a.kind in ("legacy", "modern", "http", "budget", "wire")]
    minutes = max(1, math.ceil(r.minutes - 1e-9))
    lat: dict[tuple[int, str], list[float]] = defaultdict(list)
    fleet_lat: dict[int, list[float]] = defaultdict(list)
    for a in calls:
        m = min(int(a.t // 60), minutes - 1)
        if a.outcome in ACK:
            lat[(m, a.replica or "?")].append(a.ms)
            fleet_lat[m].append(a.ms)
    samples: dict[tuple[int, str], Sample] = {}
    for s in j.samples:
        m = min(max(0, round(s.t / 60)), minutes)
        samples[(m, s.replica)] = s
    faults_in: dict[int, list[str]] = defaultdict(list)
    for f in j.faults:
        faults_in[int(f.start // 60)].append(f"{f.name} {f.target}")
    r.table = [
        "| minute | replica | pid | RSS MB (end of minute) | open fds | PG conns | calls answered "
        "| p50 ms | p99 ms | max ms "
        "| fleet p99 ms | fault in this minute |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in range(minutes):
        for i, name in enumerate(fleet.replicas):
            smp = samples.get((m + 1, name))
            ls = lat.get((m, name), [])
            r.table.append(
                "| "
                + " | ".join(
                    [
                        str(m + 1) if i == 0 else "",
                        name,
                        str(smp.pid) if smp else "",
                        f"{smp.rss / 2**20:.0f}" if smp else "",
                        str(smp.fds) if smp else "",
                        str(smp.pg) if smp else "",
                        f"{len(ls):,}",
                        f"{statistics.median(ls):.0f}" if ls else "",
                        f"{_pct(ls, 99):.0f}" if ls else "",
                        f"{max(ls):.0f}" if ls else "",
                        f"{_pct(fleet_lat[m], 99):.0f}" if i == 0 and fleet_lat[m] else "",
                        "; ".join(faults_in.get(m, [])) if i == 0 else "",
                    ]
                )
                + " |"
            )
    # growth, per process (a restart starts a new one)
    growth = []
    for name in fleet.replicas:
        mine = [s for s in j.samples if s.replica == name]
        for pid in dict.fromkeys(s.pid for s in mine):
            seg = [s for s in mine if s.pid == pid]
            if len(seg) >= 3:
                first, last = seg[1], seg[-1]  # from the first minute on: start-up and warm-up done
                growth.append(
                    f"{name} (pid {pid}, {(last.t - first.t) / 60:.0f} min): RSS {first.rss / 2**20:.0f} → "
                    f"{last.rss / 2**20:.0f} MB ({(last.rss - first.rss) / 2**20:+.1f} MB), "
                    f"fds {first.fds} → {last.fds}"
                )
    r.summary = growth


# -- running it ---------------------------------------------------------------------------------


def verify_audit(config: Path) -> tuple[int, str]:
    done = subprocess.run(
        [str(BASTION), "audit", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=processes.REPO,
    )
    return done.returncode, done.stdout + done.stderr


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: through every `finally`, so every process is stopped."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def soak(minutes: float, replicas: int, concurrency: int, work: Path, command: str) -> SoakResult:
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    revision = git_revision()
    t_start = time.perf_counter()
    fleet = Fleet(work, replicas, say)
    try:
        r = SoakResult(
            command, started, minutes, replicas, concurrency, Journal(), startup=list(fleet.startup_failures)
        )
        r.revision = revision
        r.journal = asyncio.run(Soak(fleet, minutes * 60, concurrency).run())
        with (work / "attempts.jsonl").open("w") as out:  # for a closer look afterwards
            for a in r.journal.attempts:
                out.write(json.dumps(a.__dict__) + "\n")
        say("load done; stopping the replicas cleanly (SIGTERM), then checking")
        executions = httpx.get(f"{fleet.upstream_base}/executions", timeout=60).json()["counts"]
        if fleet.haproxy is not None:
            fleet.haproxy.child.stop()
            r.journal.haproxy_logged = sum(
                1
                for ln in fleet.haproxy.child.log.read_text(errors="replace").splitlines()
                if HAPROXY_LINE.match(ln)
            )
        for rep in fleet.replicas.values():
            rep.child.stop(60)
            if rep.child.popen is not None and rep.child.popen.returncode not in (0, -signal.SIGTERM):
                r.startup.append(f"{rep.name} exited {rep.child.popen.returncode} on SIGTERM")
        assert fleet.pg is not None
        rows = asyncio.run(audit_rows(fleet.pg.dsn))
        budgets = asyncio.run(budget_rows(fleet.pg.dsn))
        verify = verify_audit(next(iter(fleet.replicas.values())).config)
        analyse(r, fleet, executions, rows, budgets, verify)
        r.summary.insert(0, f"{len(rows):,} audit records in PostgreSQL at the end")
    finally:
        fleet.close()
    r.seconds = time.perf_counter() - t_start
    return r


def render_soak(r: SoakResult) -> str:
    j = r.journal
    kinds = Counter(a.kind for a in j.attempts)
    outcomes = Counter(a.outcome for a in j.attempts)
    lines = [SOAK_BEGIN, "### Latest soak", ""]
    if not r.ok:
        bad = [c.name for c in r.checks if not c.ok]
        lines += [f"**FAILED CHECKS: {'; '.join(bad)}** (details below)", ""]
    lines += [
        f"- command: `{r.command}`",
        f"- when: {r.started}; code: {r.revision}; took {r.seconds / 60:.1f} min in all",
        f"- machine: {machine()} (shared by the load generator, HAProxy, PostgreSQL, the upstream and "
        "every replica)",
        f"- {r.replicas} replicas behind HAProxy {haproxy_version()}, PostgreSQL {pg_version()} (a private "
        f"cluster), one upstream (the SDK's default server); load for {j.seconds / 60:.1f} min, "
        f"concurrency {r.concurrency} plus the paced budget and approval clients",
        f"- requests: {len(j.attempts):,} ("
        + ", ".join(f"{k} {n:,}" for k, n in sorted(kinds.items()))
        + "); outcomes: "
        + ", ".join(f"{k} {n:,}" for k, n in sorted(outcomes.items())),
        "",
        "Faults (seconds from the start of the load; recovered = every replica UP in HAProxy again):",
        "",
    ]
    for f in j.faults:
        lines.append(
            f"- t={f.start:.0f} s: {f.name}, {f.target}; recovered after {f.recovered - f.start:.1f} s"
            + (f" ({'; '.join(f.notes)})" if f.notes else "")
        )
    if j.transitions:
        trans = [f"{t:.1f} s {name} {old or '-'}→{new}" for t, name, old, new in j.transitions if old]
        if trans:
            lines.append("- HAProxy saw: " + ", ".join(trans))
    if r.startup:
        lines += ["", "Start-up and shutdown:", "", *(f"- {s}" for s in r.startup)]
    lines += ["", "Checks:", ""]
    for c in r.checks:
        lines.append(f"- **{'PASS' if c.ok else 'FAIL'}**: {c.name}")
        lines += [f"  - {ln}" for ln in c.lines]
    lines += ["", "Failed requests, by fault:", ""]
    lines += [f"- {f}" if not f.startswith("  ") else f"  - {f.strip()}" for f in r.failures] or ["- none"]
    lines += [
        "",
        "Each replica, minute by minute (RSS, fds and PostgreSQL connections sampled at the end of the "
        "minute; calls and latency of the calls that replica answered, attributed by HAProxy's "
        "`X-Fleet-Replica` header; latency is the client's, through HAProxy, retries counted apart):",
        "",
        *r.table,
        "",
        "Growth:",
        "",
        *(f"- {s}" for s in r.summary),
        SOAK_END,
    ]
    return "\n".join(lines) + "\n"


def haproxy_version() -> str:
    try:
        out = subprocess.run(["/usr/sbin/haproxy", "-v"], capture_output=True, text=True, timeout=10).stdout
        return out.split()[2]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def pg_version() -> str:
    try:
        out = subprocess.run(
            ["/usr/lib/postgresql/15/bin/postgres", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        return out.split()[2]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "15"


# -- capacity -----------------------------------------------------------------------------------


@dataclass
class Step:
    n: int
    calls: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    pg_peak: dict[str, int] = field(default_factory=dict)
    pg_total_peak: int = 0
    busy: list[float] = field(default_factory=list)
    served: Counter[str] = field(default_factory=Counter)
    machine_s: float = 0.0
    """CPU seconds the whole machine was busy (/proc/stat) during the timed calls."""
    processes_s: float = 0.0
    """CPU seconds of every process on the machine (/proc/<pid>/stat) during the timed calls."""


def _machine_busy() -> tuple[float, float]:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    vals = [float(x) for x in fields]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def _all_cpu() -> dict[int, float]:
    """CPU seconds used so far by every process on the machine, by pid."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            out[int(entry)] = processes.cpu_seconds(int(entry))
    return out


class Watch:
    """PostgreSQL connections per replica and in all, sampled every 0.5 s while a step runs."""

    def __init__(self, fleet: Fleet, step: Step) -> None:
        self.fleet, self.step = fleet, step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assert self.fleet.pg is not None
        pids = {n: r.pid for n, r in self.fleet.replicas.items()}
        while not self._stop.wait(0.5):
            conns = pg_connections(self.fleet.pg.port, pids)
            for name, c in conns.items():
                self.step.pg_peak[name] = max(self.step.pg_peak.get(name, 0), c)
            self.step.pg_total_peak = max(self.step.pg_total_peak, sum(conns.values()))

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class CapacityResult:
    command: str
    started: str
    concurrency: int
    calls: int
    rounds: int
    steps: dict[int, Step]
    pg_settings: str = ""
    seconds: float = 0.0
    revision: str = ""
    notes: list[str] = field(default_factory=list)


def capacity(
    replicas: int, concurrency: int, calls: int, rounds: int, work: Path, command: str
) -> CapacityResult:
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    fleet = Fleet(work, replicas, say)
    res = CapacityResult(
        command, started, concurrency, calls, rounds, {n: Step(n) for n in range(1, replicas + 1)}
    )
    res.revision = git_revision()
    res.notes += fleet.startup_failures
    try:
        hap = fleet.haproxy
        assert hap is not None and fleet.pg is not None and fleet.upstream is not None
        res.pg_settings = fleet.pg.psql("SHOW max_connections").strip()
        url = f"{fleet.url}/mcp/{UPSTREAM}"
        token = fleet.key.mint("dev-alice", audience=fleet.url, groups=["developers"])
        names = list(fleet.replicas)
        order = list(range(1, replicas + 1))
        for rnd in range(rounds):
            for n in order if rnd % 2 == 0 else reversed(order):
                step = res.steps[n]
                for i, name in enumerate(names):
                    hap.set_enabled(name, i < n)
                hap.wait_up(names[:n])
                time.sleep(1.5)
                pids = {name: fleet.replicas[name].pid for name in names}
                pids |= {"upstream": fleet.upstream.pid, "haproxy": hap.child.pid}

                def cpu(pids: dict[str, int] = pids) -> dict[str, float]:
                    out = {name: processes.cpu_seconds(pid) for name, pid in pids.items()}
                    assert fleet.pg is not None
                    out["postgres"] = sum(processes.cpu_seconds(pid) for pid in fleet.pg.pids())
                    return out

                say(f"round {rnd + 1}/{rounds}: {n} replica(s), {calls} calls at C = {concurrency}")
                warm = asyncio.run(drive(url, token, {"text": "hello"}, 0, concurrency, 200, MODERN))
                if warm.errors:
                    raise RuntimeError(
                        f"{n} replicas, warm-up: {warm.errors} failed; first: {warm.first_error}"
                    )
                served_before = _served(hap)
                busy0, all0 = _machine_busy(), _all_cpu()
                with Watch(fleet, step):
                    lr = asyncio.run(drive(url, token, {"text": "hello"}, calls, concurrency, 0, MODERN, cpu))
                busy1, all1 = _machine_busy(), _all_cpu()
                if lr.errors:
                    raise RuntimeError(
                        f"{n} replicas: {lr.errors} of {lr.calls} calls failed; first: {lr.first_error}"
                    )
                served_after = _served(hap)
                for name in names:
                    step.served[name] += served_after.get(name, 0) - served_before.get(name, 0)
                step.calls += lr.calls
                step.seconds += lr.seconds
                step.latencies += lr.latencies_ms
                for k, v in lr.cpu_ms_per_call.items():
                    step.cpu_s[k] = step.cpu_s.get(k, 0.0) + v * lr.calls / 1000
                step.busy.append((busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1]))
                step.machine_s += (busy1[0] - busy0[0]) / os.sysconf("SC_CLK_TCK")
                step.processes_s += sum(v - all0.get(pid, 0.0) for pid, v in all1.items())
                say(f"  {lr.calls_per_s:.0f} calls/s, p50 {lr.p50:.1f} ms, p99 {lr.p99:.1f} ms")
    finally:
        fleet.close()
    res.seconds = time.perf_counter() - t_start
    return res


def _served(hap: Any) -> dict[str, int]:
    """Requests each replica answered so far (HAProxy's per-server `stot`, health checks excluded)."""
    out: dict[str, int] = {}
    for line in hap.command("show stat").splitlines():
        cols = line.split(",")
        if len(cols) > 7 and cols[0] == "replicas" and cols[1] not in ("FRONTEND", "BACKEND"):
            out[cols[1]] = int(cols[7] or 0)
    return out


def render_capacity(res: CapacityResult) -> str:
    lines = [
        CAP_BEGIN,
        "### Latest capacity run",
        "",
        f"- command: `{res.command}`",
        f"- when: {res.started}; code: {res.revision}; took {res.seconds / 60:.1f} min",
        f"- machine: {machine()}",
        f"- load: 2026-07-28 stateless `tools/call` of `echo` through HAProxy, C = {res.concurrency} "
        f"agents each on its own keep-alive connection, every answer checked; {res.calls} calls per "
        f"replica count per round after 200 warm-up calls, {res.rounds} rounds in alternating order "
        "(1, 2, 3, then 3, 2, 1), the replicas not in rotation disabled in HAProxy (idle, still connected)",
        f"- PostgreSQL: private cluster, `max_connections` {res.pg_settings}, defaults otherwise "
        "(`synchronous_commit` on)",
        "",
        "| replicas | calls/s | p50 ms | p99 ms | machine CPU busy | Bastion CPU ms per call (all replicas) "
        "| per replica: CPU ms per call it served | PostgreSQL CPU ms/call | HAProxy | upstream "
        "| load generator "
        "| PG connections per replica (peak) |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for n, s in res.steps.items():
        if not s.calls:
            continue
        per = s.calls / 1000
        names = sorted(k for k in s.cpu_s if k.startswith("replica-"))
        active = names[:n]
        bastion = sum(s.cpu_s[k] for k in active) / per
        own = ", ".join(
            f"{k}: {s.cpu_s[k] / max(1, s.served.get(k, 0)) * 1000:.2f} ({s.served.get(k, 0):,} calls)"
            for k in active
        )
        lat = LoadLat(s.latencies)
        cells = [
            str(n),
            f"{s.calls / s.seconds:,.0f}",
            f"{lat.p(50):.1f}",
            f"{lat.p(99):.1f}",
            f"{statistics.mean(s.busy) * 100:.0f}%",
            f"{bastion:.2f}",
            own,
            f"{s.cpu_s.get('postgres', 0) / per:.2f}",
            f"{s.cpu_s.get('haproxy', 0) / per:.2f}",
            f"{s.cpu_s.get('upstream', 0) / per:.2f}",
            f"{s.cpu_s.get('load generator', 0) / per:.2f}",
            ", ".join(f"{k} {s.pg_peak.get(k, 0)}" for k in names) + f" (all {s.pg_total_peak})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Where the machine's CPU went, ms per call (the fleet's processes: every replica, idle ones "
        "included, PostgreSQL, HAProxy, the upstream and the load generator; every process: read "
        "from /proc for each pid; the machine: /proc/stat, kernel time included):",
        "",
        "| replicas | the fleet's processes | every process on the machine | the machine busy "
        "| not the fleet's | ceiling at this cost (2 cores) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, s in res.steps.items():
        if not s.calls:
            continue
        per = s.calls / 1000
        fleet_ms = sum(s.cpu_s.values()) / per
        every = s.processes_s / per
        busy = s.machine_s / per
        lines.append(
            f"| {n} | {fleet_ms:.2f} | {every:.2f} | {busy:.2f} | {every - fleet_ms:.2f} "
            f"| {2000 / busy:,.0f} calls/s |"
        )
    lines += ["", *(f"- note: {x}" for x in res.notes), CAP_END]
    return "\n".join(lines) + "\n"


class LoadLat:
    def __init__(self, data: list[float]) -> None:
        self.data = sorted(data)

    def p(self, q: float) -> float:
        return _pct(self.data, q)


# -- the command --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    p.add_argument("--replicas", type=int, default=3, help="Bastion replicas (default 3)")
    p.add_argument(
        "--concurrency", type=int, help="soak: free-running clients (default 12); capacity: C (16)"
    )
    p.add_argument(
        "--work-dir", type=Path, help="keep configs, keys and logs here (default: a temporary dir)"
    )
    p.add_argument("--no-write", action="store_true", help="print only; do not update docs/scale.md")
    p.add_argument("--capacity", action="store_true", help="measure calls/s with 1..N replicas instead")
    p.add_argument("--calls", type=int, default=4000, help="capacity: calls per replica count per round")
    p.add_argument("--rounds", type=int, default=2, help="capacity: rounds (default 2)")
    p.add_argument("--output", type=Path, default=DOC, help="markdown file to update (default docs/scale.md)")
    args = p.parse_args(argv)
    if args.replicas < 1 or args.minutes <= 0:
        p.error("--replicas must be at least 1 and --minutes positive")
    if args.replicas < 2 and not args.capacity:
        p.error("the soak needs at least 2 replicas")
    command = shlex.join(["python", "-m", "bench.fleet", *(sys.argv[1:] if argv is None else argv)])
    with _terminate_on_sigterm(), tempfile.TemporaryDirectory(prefix="bastion-fleet-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.capacity:
            res = capacity(args.replicas, args.concurrency or 16, args.calls, args.rounds, work, command)
            section, begin, end, heading = render_capacity(res), CAP_BEGIN, CAP_END, "## Capacity (measured)"
            ok = True
        else:
            r = soak(args.minutes, args.replicas, args.concurrency or 12, work, command)
            section, begin, end, heading = render_soak(r), SOAK_BEGIN, SOAK_END, "## Soak (measured)"
            ok = r.ok
    print(section)
    if not args.no_write:
        replace_section(args.output, section, begin, end, heading)
        say(f"written to {args.output}")
    if not ok:
        say("SOME CHECKS FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
