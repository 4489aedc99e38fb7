"""The A2A front, measured: a message sent direct to an agent vs. through `/a2a/{agent}`.

    python -m bench.a2a [-n N] [-c C ...] [--rounds R] [--work-dir DIR] [--no-write]

Four kinds of process share the machine, as in `python -m bench.llm`: the agent (the tests' a2a-sdk
echo agent in its own process, `bench.a2a_agent`), the bench's bare forwarding proxy in front of
it (`bench.passthrough` on Bastion's HTTP stack, no governance: the floor any proxy written this
way stands on), Bastion (`bastion serve` on a generated config: the repo's policies plus one
permitting `send_message` to every agent, SQLite audit and state, the dev key's JWKS as issuer, the
agent as `agents.echo`) and this process, the load generator (raw httpx, no SDK: C workers, each
with its own client and keep-alive connection).

The scenario: an A2A 1.0 `SendMessage` (header `A2A-Version: 1.0`) with one text part and one
data part `{"amount": 5}`, each with a new `messageId`; the agent answers with a completed task
whose artifact echoes both. Through Bastion, every message is authenticated (a Bearer JWT), decided
by Cedar (`send_message` on `Agent::"echo"`), audited (a write-ahead and a final record) and
forwarded with a delegation token. Every answer on every path is checked (a JSON-RPC result, the
task completed, the echo right); failures are counted and reported, never hidden.

Interleaved: the N calls of every (concurrency, path) are split into R rounds; each round runs
every concurrency on every path in turn (the paths' order alternating between rounds), so a noisy
neighbour or a drifting machine lands on all of them alike. CPU per call is read from
`/proc/<pid>/stat` around each timed segment (warm-up excluded), per process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shlex
import shutil
import sqlite3
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import processes
from bench.harness import git_revision, machine
from bench.load import LoadResult
from bench.report import replace_section
from gateway.identity.devkeys import DEV_ISSUER, ensure_dev_key

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-a2a:begin -->"
END = "<!-- bench-a2a:end -->"
HEADING = "## A2A front"
AGENT = "echo"
SUBJECT = "echo-bot"
POLICY = """@id("bench-agents") @reason("bench")
permit(principal, action == Action::"send_message", resource is Agent);
"""
TEXT = "Please book the meeting room for Thursday at ten."
DATA = {"amount": 5}
ECHO = "echo: " + TEXT
MAX_ERRORS_KEPT = 5


@dataclass(frozen=True)
class Arm:
    """One path a message takes: direct to the agent, through the bare proxy, or through Bastion."""

    key: str
    title: str
    url: str
    token: str | None = None
    """Bastion's Bearer token (None: the agent and the bare proxy ask for none)."""
    middle: tuple[str, int] | None = None
    """The process between the client and the agent: (name in the CPU split, pid); None: direct."""

    def headers(self) -> dict[str, str]:
        hdrs = {"content-type": "application/json", "accept": "application/json", "a2a-version": "1.0"}
        if self.token:
            hdrs["authorization"] = f"Bearer {self.token}"
        return hdrs


def body(call: int) -> bytes:
    """One `SendMessage`: a text part and a data part, a new `messageId` (Bastion's call id)."""
    message = {
        "role": "ROLE_USER",
        "messageId": uuid.uuid4().hex,
        "parts": [{"text": TEXT}, {"data": DATA}],
    }
    doc = {"jsonrpc": "2.0", "id": call, "method": "SendMessage", "params": {"message": message}}
    return json.dumps(doc, separators=(",", ":")).encode()


def check(status: int, data: bytes) -> str | None:
    """Why an answer is not a completed echo task, or None when it is."""
    if status != 200:
        return f"HTTP {status}: {data[:200]!r}"
    try:
        doc = json.loads(data)
        if "error" in doc or "result" not in doc:
            return f"JSON-RPC error: {json.dumps(doc.get('error'))[:300]}"
        task = doc["result"]["task"]
        state = task["status"]["state"]
        parts = [p for a in task.get("artifacts", []) for p in a.get("parts", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable answer ({type(exc).__name__}: {exc}): {data[:200]!r}"
    if state != "TASK_STATE_COMPLETED":
        return f"task {state}, not completed: {data[:200]!r}"
    if [p.get("text") for p in parts if "text" in p] != [ECHO] or [
        p.get("data") for p in parts if "data" in p
    ] != [DATA]:
        return f"unexpected artifact: {data[:300]!r}"
    return None


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one (concurrency, path) has measured so far, over all its rounds."""

    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    """The first few problems (`MAX_ERRORS_KEPT`)."""
    cpu_s: dict[str, float] = field(default_factory=dict)

    def result(self) -> LoadResult:
        n = len(self.latencies_ms)
        cpu = {k: v / n * 1000 for k, v in self.cpu_s.items()} if n else {}
        first = self.errors[0] if self.errors else None
        return LoadResult(n, self.failures, self.seconds, self.latencies_ms, first, cpu)


_LIMITS = httpx.Limits(max_connections=1, max_keepalive_connections=1)
_TLS = ssl.create_default_context()
"""Shared by every client (all plain http): a client builds a new one otherwise, at ~10 ms each."""


async def _segment(arm: Arm, count: int, concurrency: int, tally: Tally, agent: int, timed: bool) -> None:
    """`count` messages, `concurrency` at a time, into `tally` (failures always; the rest if `timed`).

    Each worker has its own client and keep-alive connection (as in `bench.llm`), opened for this
    segment only: a connection left idle while the other paths run would meet the server's 5 s
    keep-alive timeout, and now and then be closed just as a request is sent on it."""
    clients = [httpx.AsyncClient(limits=_LIMITS, timeout=60, verify=_TLS) for _ in range(concurrency)]
    try:
        await _calls(clients, arm, count, tally, agent, timed)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def _calls(
    clients: list[httpx.AsyncClient], arm: Arm, count: int, tally: Tally, agent: int, timed: bool
) -> None:
    headers = arm.headers()
    remaining = count
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            content = body(remaining + 1)
            t0 = time.perf_counter()
            try:
                response = await client.post(arm.url, content=content, headers=headers)
                latency = time.perf_counter() - t0
                problem = check(response.status_code, response.content)
            except httpx.HTTPError as exc:
                latency, problem = time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
            latencies.append(latency * 1000)
            if problem:
                errors.append(problem)

    pids = {"agent": agent, **dict([arm.middle] if arm.middle else [])}
    # as in bench.load: a collection in the load generator would stall every call in flight
    gc.collect()
    gc.disable()
    before = {name: processes.cpu_seconds(pid) for name, pid in pids.items()}
    own, t0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        gc.enable()
    seconds, own = time.perf_counter() - t0, time.process_time() - own
    tally.failures += len(errors)
    tally.errors += errors[: MAX_ERRORS_KEPT - len(tally.errors)]
    if not timed:
        return
    tally.latencies_ms += latencies
    tally.seconds += seconds
    spent = {name: processes.cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    for name, value in {"load generator": own, **spent}.items():
        tally.cpu_s[name] = tally.cpu_s.get(name, 0.0) + value


async def drive(
    levels: list[int], arms: list[Arm], agent: int, n: int, rounds: int, progress: bool = True
) -> tuple[dict[tuple[int, str], Tally], dict[tuple[int, str], Tally]]:
    """Warm every (concurrency, path) up, then run the rounds; `agent` is the agent's pid.
    Returns the timed tallies and the warm-ups' (whose failures count too)."""
    tallies = {(c, a.key): Tally() for c in levels for a in arms}
    warm = {(c, a.key): Tally() for c in levels for a in arms}
    # what is alive now lives through the run: frozen, the collection before each segment skips it
    gc.collect()
    gc.freeze()
    try:
        for c in levels:
            for arm in arms:
                await _segment(arm, warmup(n, c), c, warm[(c, arm.key)], agent, False)
        for r in range(rounds):
            count = n // rounds + (1 if r < n % rounds else 0)
            t0 = time.perf_counter()
            for c in levels:
                for arm in arms if r % 2 == 0 else reversed(arms):
                    tally = tallies[(c, arm.key)]
                    await _segment(arm, count, c, tally, agent, True)
                    if progress:
                        done = sorted(tally.latencies_ms[-count:])
                        print(
                            f"bench.a2a:   C = {c}, {arm.key}: p50 {done[len(done) // 2]:.1f} ms, "
                            f"max {done[-1]:.1f} ms, {tally.failures} failed so far",
                            file=sys.stderr,
                        )
            if progress:
                print(
                    f"bench.a2a: round {r + 1}/{rounds} in {time.perf_counter() - t0:.1f} s", file=sys.stderr
                )
    finally:
        gc.unfreeze()
    return tallies, warm


def warmup(n: int, concurrency: int) -> int:
    return min(100, max(n // 10, concurrency))


# -- the processes ------------------------------------------------------------------------------


def gateway_config(work: Path, agent_url: str, port: int) -> dict[str, Any]:
    """Bastion's config: the repo's policies plus `POLICY`, SQLite audit and state in `work`.

    Logging stays at Bastion's default (`info`, one line per call), as in `bench.llm`."""
    key = ensure_dev_key(work)
    policies = work / "policies"
    if not policies.exists():
        shutil.copytree(processes.REPO / "policies", policies)
        (policies / "a2a.cedar").write_text(POLICY)
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(key.jwks_path)}]},
        "policy": {"dir": str(policies)},
        "audit": {"url": f"sqlite+aiosqlite:///{work / 'bastion-audit.db'}"},
        "state": {"url": f"sqlite+aiosqlite:///{work / 'bastion-state.db'}"},
        "data_dir": str(work),
        "agents": {AGENT: {"url": agent_url, "subject": SUBJECT}},
    }


@contextmanager
def agent_process(work: Path) -> Iterator[tuple[processes.Proc, str]]:
    """The agent (`bench.a2a_agent`) in its own process; yields it and its URL (not yet ready:
    see `wait_agent`)."""
    port = processes.free_port()
    argv = [sys.executable, "-m", "bench.a2a_agent", "--port", str(port)]
    proc = processes.Proc("agent", argv, work / "agent.log")
    try:
        yield proc, f"http://127.0.0.1:{port}/"
    finally:
        proc.stop()


def wait_agent(proc: processes.Proc, url: str) -> None:
    processes.wait_ready(proc, url + ".well-known/agent-card.json", (200,))


@contextmanager
def proxy_process(work: Path, agent_url: str) -> Iterator[tuple[processes.Proc, str]]:
    """The bench's bare proxy (`bench.passthrough`, forwarding `A2A-Version` too) in front of the
    agent, in its own process; not yet ready: see `wait_proxy`."""
    port = processes.free_port()
    argv = [sys.executable, "-m", "bench.a2a_agent", "--port", str(port), "--forward-to", agent_url]
    proc = processes.Proc("proxy", argv, work / "proxy.log")
    try:
        yield proc, f"http://127.0.0.1:{port}/"
    finally:
        proc.stop()


def wait_proxy(proc: processes.Proc, url: str) -> None:
    # a GET reaches the agent's JSON-RPC route, which allows POST only: 405 means both are up
    processes.wait_ready(proc, url, (405,))


def audited(work: Path) -> tuple[int, int]:
    """(records, distinct call ids) of the A2A front in Bastion's audit DB (read after it stopped)."""
    db = work / "bastion-audit.db"
    if not db.exists():
        return 0, 0
    with sqlite3.connect(db) as conn:
        rows, ids = conn.execute(
            "SELECT count(*), count(DISTINCT call_id) FROM audit_records WHERE protocol = 'a2a'"
        ).fetchone()
    return int(rows), int(ids)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class A2ARun:
    n: int
    levels: list[int]
    rounds: int
    command: str
    machine: str
    started: str
    arms: list[tuple[str, str]]
    """(key, title) of each path."""
    results: dict[tuple[int, str], LoadResult] = field(default_factory=dict)
    warm_failures: dict[tuple[int, str], Tally] = field(default_factory=dict)
    sent_via_bastion: int = 0
    audit: tuple[int, int] = (0, 0)
    seconds: float = 0.0

    def failures(self) -> list[str]:
        """One line per (concurrency, path) with failures, warm-up included."""
        out = []
        for (c, key), res in self.results.items():
            warm = self.warm_failures.get((c, key))
            failed = res.errors + (warm.failures if warm else 0)
            if failed:
                first = res.first_error or (warm.errors[0] if warm and warm.errors else "")
                out.append(f"C = {c}, {key}: {failed} failed; first: {first[:300]}")
        return out


def run(n: int, levels: list[int], command: str, *, rounds: int = 4, work_dir: Path | None = None) -> A2ARun:
    rounds = max(1, min(rounds, n))
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bastion-bench-a2a-") as tmp:
        work = work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            # started together, ready together: each spends seconds importing
            agent, agent_url = stack.enter_context(agent_process(work))
            proxy, proxy_url = stack.enter_context(proxy_process(work, agent_url))
            port = processes.free_port()
            base = f"http://127.0.0.1:{port}"
            cfg = gateway_config(work, agent_url, port)
            bastion, _ = stack.enter_context(processes.bastion(work, cfg, "bastion", ready=False))
            token = ensure_dev_key(work).mint("bench", audience=base, groups=["developers"])
            wait_agent(agent, agent_url)
            wait_proxy(proxy, proxy_url)
            processes.wait_bastion(bastion, base)
            arms = [
                Arm("direct", "direct to the agent", agent_url),
                Arm("proxy", "bare proxy (no governance)", proxy_url, None, ("proxy", proxy.pid)),
                Arm("bastion", "through Bastion", f"{base}/a2a/{AGENT}", token, ("bastion", bastion.pid)),
            ]
            result = A2ARun(n, levels, rounds, command, machine(), started, [(a.key, a.title) for a in arms])
            tallies, warm = asyncio.run(drive(levels, arms, agent.pid, n, rounds))
        # every process stopped: Bastion's final audit records are written
        result.audit = audited(work)
    result.sent_via_bastion = sum(n + warmup(n, c) for c in levels)
    result.results = {key: tally.result() for key, tally in tallies.items()}
    result.warm_failures = warm
    result.seconds = time.perf_counter() - t_start
    return result


# -- the report ---------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f}"


def render(r: A2ARun) -> str:
    titles = dict(r.arms)
    failures = r.failures()
    lines = [BEGIN, "### Latest run", ""]
    if failures:
        lines += [
            f"**WARNING: THIS RUN HAD FAILURES ({len(failures)} path(s)); its numbers are not to be "
            "trusted:**",
            "",
            *(f"- **{f}**" for f in failures),
            "",
        ]
    rows, ids = r.audit
    lines += [
        f"- command: `{r.command}`",
        f"- when: {r.started}; code: {git_revision()}; took {r.seconds / 60:.1f} min",
        f"- machine: {r.machine}",
        f"- N = {r.n} messages per concurrency and path (after a warm-up), concurrency C = "
        f"{', '.join(map(str, r.levels))}, interleaved in {r.rounds} rounds; load generator: raw "
        "httpx, one keep-alive connection per worker and path",
        "- message: A2A 1.0 `SendMessage` (`A2A-Version: 1.0`), one text part and one data part "
        '`{"amount": 5}`, a new `messageId` each; answer: a completed task, one artifact echoing both '
        "(the tests' a2a-sdk echo agent, in its own process); every answer on every path checked",
        "- paths: direct to the agent; the bench's bare proxy (`bench.passthrough`, Bastion's HTTP "
        "stack and upstream client, no governance; `A2A-Version` forwarded); Bastion (`/a2a/echo`: "
        "JWT, Cedar `send_message`, SQLite audit with write-ahead + final record, delegation token; "
        "repo policies + one permit; logging at its default level)",
        f"- failures: {sum(res.errors for res in r.results.values())} in the timed rounds, "
        f"{sum(t.failures for t in r.warm_failures.values())} in the warm-ups; Bastion's audit DB "
        f"afterwards: {rows} A2A records for {ids} distinct message ids ({r.sent_via_bastion} "
        "messages sent through it)",
        "",
        "| C | path | calls/s | p50 ms | p99 ms | added p50 ms vs direct | added p99 ms vs direct "
        "| proxy/Bastion CPU ms/call | agent CPU ms/call | load gen. CPU ms/call | failed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in r.levels:
        direct = r.results[(c, "direct")]
        for key, _ in r.arms:
            res = r.results[(c, key)]
            cpu = res.cpu_ms_per_call
            middle = cpu.get("bastion", cpu.get("proxy"))
            added = (
                ["", ""]
                if key == "direct"
                else [f"{res.p50 - direct.p50:+.2f}", f"{res.p99 - direct.p99:+.2f}"]
            )
            cells = [
                str(c),
                titles[key],
                f"{res.calls_per_s:,.0f}",
                _ms(res.p50),
                _ms(res.p99),
                *added,
                "" if middle is None else _ms(middle),
                _ms(cpu.get("agent", float("nan"))),
                _ms(cpu.get("load generator", float("nan"))),
                str(res.errors + r.warm_failures[(c, key)].failures),
            ]
            lines.append(f"| {' | '.join(cells)} |")
    lines += ["", "Ratios (same C, same rounds):", ""]
    for c in r.levels:
        d, p, b = (r.results[(c, k)] for k in ("direct", "proxy", "bastion"))
        b_cpu, p_cpu = b.cpu_ms_per_call.get("bastion", 0.0), p.cpu_ms_per_call.get("proxy", 0.0)
        lines.append(
            f"- C = {c}: Bastion's CPU per message / the bare proxy's = "
            f"{b_cpu / p_cpu if p_cpu else float('nan'):.1f}x; "
            f"calls/s through Bastion / direct = {b.calls_per_s / d.calls_per_s:.2f}, "
            f"bare proxy / direct = {p.calls_per_s / d.calls_per_s:.2f}; "
            f"Bastion's CPU per message / the agent's = "
            f"{b_cpu / b.cpu_ms_per_call['agent'] if b.cpu_ms_per_call.get('agent') else float('nan'):.1f}x"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def write(path: Path, section: str) -> None:
    """Replace this benchmark's section in `path` (appended under `HEADING` the first time)."""
    replace_section(path, section, BEGIN, END, HEADING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.a2a", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000, help="messages per concurrency and path (default 2000)")
    p.add_argument(
        "-c", "--concurrency", type=int, nargs="+", default=[1, 16], help="messages in flight (default 1 16)"
    )
    p.add_argument("--rounds", type=int, default=4, help="interleaving rounds (default 4)")
    p.add_argument("--work-dir", type=Path, help="keep configs, databases and logs here (default: temporary)")
    p.add_argument("--output", type=Path, default=DOC, help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.n < 1 or args.rounds < 1 or min(args.concurrency) < 1:
        p.error("-n, -c and --rounds must be at least 1")
    levels = list(dict.fromkeys(args.concurrency))
    command = shlex.join(["python", "-m", "bench.a2a", *(sys.argv[1:] if argv is None else argv)])
    result = run(args.n, levels, command, rounds=args.rounds, work_dir=args.work_dir)
    section = render(result)
    print(section)
    if not args.no_write:
        write(args.output, section)
        print(f"written to {args.output}", file=sys.stderr)
    if failures := result.failures():
        print("bench.a2a: FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
