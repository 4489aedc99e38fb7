"""Audit sinks, measured: what streaming the trail costs the governed calls.

    python -m bench.sinks [-n N] [-c C] [--rounds R] [--work-dir DIR] [--no-write]

Four Bastions (`bastion serve`, each on its own port, SQLite audit and state files and dev key),
all in front of the same upstream (`bench.upstream`, stateless JSON), differ only in
`audit.sinks`:

- (n) no sink;
- (f) a file sink, `jsonl` (fsynced appends; `max_bytes` raised so that no rotation happens);
- (h) an HTTP sink, `ocsf`, to `bench.sink_receiver` in its own process (answers every batch
  200 `{"text":"Success","code":0}` and counts what it got);
- (d) an HTTP sink to a port nobody listens on: every delivery is refused, so the sink is down
  the whole run and retries with back-off (0.5 s doubling up to `backoff_max_s`, 60 s).

The load is `bench.load.drive`'s, as `python -m bench` drives a Bastion arm: C agents, each with
its own keep-alive connection, sending 2026-07-28 stateless `tools/call` of `echo`; every answer
is checked. The N calls per arm are split into R rounds; each round runs every arm in turn (the
order alternating between rounds), so a noisy neighbour lands on all arms alike. CPU is read from
`/proc/<pid>/stat` around each timed segment. After each segment of (f) and (h), the time until
the sink holds every chained record of that Bastion (`SELECT count(*) FROM audit_records WHERE seq
IS NOT NULL` on its audit DB, polled against the receiver's count or the file's lines) is
measured, with the CPU Bastion spends meanwhile; the next segment starts only then. At the end the
counts are checked: every chained record in the sink, none twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import re
import shlex
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import processes
from bench.harness import SMALL_ARGS, Arm, Tally, git_revision, machine
from bench.load import MODERN, LoadResult, drive
from bench.report import replace_section
from gateway.identity.devkeys import ensure_dev_key

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-sinks:begin -->"
END = "<!-- bench-sinks:end -->"
HEADING = "## Audit sinks"
ARMS = {
    "n": "no sink",
    "f": "file sink, `jsonl`",
    "h": "HTTP sink, `ocsf`, to a receiver process",
    "d": "HTTP sink, dead port (refused, back-off)",
}
SINK_NAME = {"f": "archive", "h": "siem", "d": "down"}
POLL_S = 0.01
"""How often the sink's count and the audit DB are compared while waiting for the sink to catch up."""
CATCH_UP_TIMEOUT_S = 120.0
MAX_ERRORS_KEPT = 5
FILE_MAX_BYTES = 2**40
"""The file sink's `max_bytes`: no rotation during the run, so its one file holds every line."""


# -- the sinks' side ----------------------------------------------------------------------------


class Lines:
    """The lines in a growing file, counted incrementally (each poll reads only what was appended)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.count = 0

    def read(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        # count complete lines only; a partly written last line is read again next time
        end = data.rfind(b"\n") + 1
        self.count += data.count(b"\n", 0, end)
        self.offset += end
        return self.count


@dataclass
class SinkArm:
    key: str
    arm: Arm
    base: str
    """Bastion's `http://127.0.0.1:PORT`."""
    db: Path
    """Bastion's SQLite audit DB."""
    sink_file: Path | None = None
    receiver: str | None = None
    """The receiver's base URL, for (h)."""
    lines: Lines | None = None

    def chained(self) -> int:
        """Chained records in this Bastion's audit DB (read beside the running Bastion, WAL)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)) as conn:
            rows = conn.execute("SELECT count(*) FROM audit_records WHERE seq IS NOT NULL").fetchall()
        return int(rows[0][0])

    async def in_sink(self, client: httpx.AsyncClient) -> int | None:
        """Distinct records the sink holds so far (file: lines), or None for a sink not watched."""
        if self.receiver is not None:
            r = await client.get(f"{self.receiver}/count")
            r.raise_for_status()
            return int(r.json()["distinct"])
        if self.lines is not None:
            return self.lines.read()
        return None


async def catch_up(arm: SinkArm) -> tuple[float | None, float]:
    """Seconds until the sink holds every chained record (None: not within `CATCH_UP_TIMEOUT_S`)
    and the CPU seconds Bastion spent meanwhile; (0, 0) for an arm whose sink is not watched."""
    if arm.receiver is None and arm.lines is None:
        return 0.0, 0.0
    t0 = time.perf_counter()
    cpu0 = processes.cpu_seconds(arm.arm.pids["bastion"])
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        while True:
            held, chained = await arm.in_sink(client), arm.chained()
            elapsed = time.perf_counter() - t0
            if held is not None and held >= chained:
                break
            if elapsed > CATCH_UP_TIMEOUT_S:
                return None, processes.cpu_seconds(arm.arm.pids["bastion"]) - cpu0
            await asyncio.sleep(POLL_S)
    return elapsed, processes.cpu_seconds(arm.arm.pids["bastion"]) - cpu0


@dataclass
class Final:
    """What the sink holds at the end, against the chained records in the audit DB."""

    chained: int
    lines: int
    distinct: int
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.lines == self.distinct == self.chained


def final_count(arm: SinkArm) -> Final | None:
    chained = arm.chained()
    if arm.receiver is not None:
        got = httpx.get(f"{arm.receiver}/count", timeout=10, trust_env=False).json()
        note = f"{got['batches']} POSTs, {got['lines'] / max(1, got['batches']):.1f} records per POST"
        if got["bad_batches"]:
            note += f"; {got['bad_batches']} batches whose lines did not match their X-Bastion-Batch"
        return Final(chained, int(got["lines"]), int(got["distinct"]), note)
    if arm.sink_file is not None:
        seen: set[tuple[str, int]] = set()
        lines = 0
        for line in arm.sink_file.read_bytes().splitlines():
            doc = json.loads(line)
            seen.add((str(doc["instance"]), int(doc["seq"])))
            lines += 1
        return Final(chained, lines, len(seen), f"{arm.sink_file.stat().st_size / 2**20:.1f} MiB")
    return None


def sink_status(arm: SinkArm) -> tuple[dict[str, Any] | None, int | None]:
    """The sink's entry in Bastion's `/readyz`, and its failed deliveries from `/metrics`."""
    name = SINK_NAME.get(arm.key)
    if name is None:
        return None, None
    ready = httpx.get(f"{arm.base}/readyz", timeout=10, trust_env=False).json()
    text = httpx.get(f"{arm.base}/metrics", timeout=10, trust_env=False).text
    found = re.search(rf'^bastion_audit_sink_failures_total\{{sink="{name}"\}} ([0-9.e+]+)$', text, re.M)
    return ready.get("sinks", {}).get(name), None if found is None else int(float(found.group(1)))


# -- the processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def receiver(work: Path) -> Iterator[tuple[processes.Proc, str]]:
    """`bench.sink_receiver` in its own process; yields it and its base URL (not yet ready: see
    `wait_receiver`)."""
    port = processes.free_port()
    argv = [sys.executable, "-m", "bench.sink_receiver", str(port)]
    proc = processes.Proc("receiver", argv, work / "receiver.log")
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def wait_receiver(proc: processes.Proc, url: str) -> None:
    processes.wait_ready(proc, f"{url}/count", (200,), 120)


def sink_config(key: str, own: Path, receiver_url: str, dead_port: int) -> list[dict[str, Any]]:
    if key == "f":
        path = str(own / "sink.jsonl")
        return [
            {"name": "archive", "type": "file", "path": path, "format": "jsonl", "max_bytes": FILE_MAX_BYTES}
        ]
    if key == "h":
        url = f"{receiver_url}/services/collector"
        return [{"name": "siem", "type": "http", "url": url, "format": "ocsf"}]
    if key == "d":
        url = f"http://127.0.0.1:{dead_port}/services/collector"
        return [{"name": "down", "type": "http", "url": url, "format": "ocsf"}]
    return []


@contextlib.contextmanager
def servers(work: Path) -> Iterator[list[SinkArm]]:
    """Start the upstream, the receiver and the four Bastions at once (they import the same heavy
    packages), wait for each; yield the arms."""
    with contextlib.ExitStack() as stack:
        up, up_url = stack.enter_context(processes.upstream(work, "json", ready=False))
        recv, recv_url = stack.enter_context(receiver(work))
        dead_port = processes.free_port()
        started: dict[str, tuple[processes.Proc, dict[str, Any], Path]] = {}
        for key in ARMS:
            own = work / f"bastion-{key}"
            cfg, _ = processes.gateway_config(own, up_url, processes.free_port())
            sinks = sink_config(key, own, recv_url, dead_port)
            if sinks:
                refused = processes.supported("audit", {**cfg["audit"], "sinks": sinks}, cfg, own)
                if refused is not None:
                    raise RuntimeError(f"this build refuses audit.sinks: {refused}")
                cfg["audit"] = {**cfg["audit"], "sinks": sinks}
            proc, _ = stack.enter_context(processes.bastion(work, cfg, f"bastion-{key}", ready=False))
            started[key] = (proc, cfg, own)
        processes.wait_mcp(up, up_url, 120)
        wait_receiver(recv, recv_url)
        arms = []
        for key, (proc, cfg, own) in started.items():
            base = f"http://127.0.0.1:{cfg['listen']['port']}"
            processes.wait_bastion(proc, base, 180)
            url = f"{base}/mcp/{processes.UPSTREAM}"
            token = ensure_dev_key(own).mint("bench", audience=url, groups=["bench"])
            pids = {"upstream": up.pid, "bastion": proc.pid, **({"receiver": recv.pid} if key == "h" else {})}
            sink_file = own / "sink.jsonl" if key == "f" else None
            arms.append(
                SinkArm(
                    key,
                    Arm(key, url, token, pids),
                    base,
                    own / "audit.db",
                    sink_file,
                    recv_url if key == "h" else None,
                    Lines(sink_file) if sink_file else None,
                )
            )
        yield arms


# -- the load -----------------------------------------------------------------------------------


@dataclass
class ArmTally:
    timed: Tally = field(default_factory=Tally)
    calls: int = 0
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    catch_up_s: list[float] = field(default_factory=list)
    after_cpu_s: float = 0.0
    """Bastion's CPU from the end of each timed segment until its sink held every record."""

    def failed(self, problem: str, count: int = 1) -> None:
        self.failures += count
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(problem)


async def segment(arm: SinkArm, n: int, concurrency: int, warmup: int, tally: ArmTally) -> None:
    """`warmup` uncounted calls or `n` timed ones, then the wait for the sink to catch up."""
    res = await drive(
        arm.arm.url,
        arm.arm.token,
        SMALL_ARGS,
        n,
        concurrency,
        warmup,
        MODERN,
        None if warmup else arm.arm.cpu,
    )
    took, cpu = await catch_up(arm)
    where = "warm-up" if warmup else "run"
    if res.errors:
        tally.failed(
            f"{where}: {res.errors} of {n or warmup} calls failed; first: {res.first_error}", res.errors
        )
    if took is None:
        tally.failed(f"{where}: the sink did not hold every chained record within {CATCH_UP_TIMEOUT_S:.0f} s")
    if warmup:
        return
    tally.timed.add(res)
    tally.calls += res.calls
    if arm.receiver is not None or arm.lines is not None:
        tally.after_cpu_s += cpu
        if took is not None:
            tally.catch_up_s.append(took)


def warmup_calls(n: int, concurrency: int) -> int:
    """As `python -m bench`: a tenth of the calls, at least C, at most 200."""
    return min(200, max(n // 10, concurrency))


# -- the run ------------------------------------------------------------------------------------


@dataclass
class SinksRun:
    n: int
    concurrency: int
    rounds: int
    command: str
    machine: str
    started: str
    results: dict[str, LoadResult] = field(default_factory=dict)
    tallies: dict[str, ArmTally] = field(default_factory=dict)
    finals: dict[str, Final] = field(default_factory=dict)
    status: dict[str, tuple[dict[str, Any] | None, int | None]] = field(default_factory=dict)
    chained: dict[str, int] = field(default_factory=dict)
    """Chained records in each arm's audit DB at the end."""
    seconds: float = 0.0

    def failures(self) -> list[str]:
        out = [f"({key}) {e}" for key, t in self.tallies.items() for e in t.errors]
        for key, fin in self.finals.items():
            if not fin.ok:
                out.append(
                    f"({key}) MISMATCH: the sink holds {fin.lines} records ({fin.distinct} distinct), "
                    f"the audit DB {fin.chained} chained"
                )
        down, _ = self.status.get("d", (None, None))
        if down is not None and (down.get("state") != "down" or down.get("delivered")):
            out.append(f"(d) the dead port's sink was not down the whole run: {down}")
        return out


def run(n: int, concurrency: int, command: str, *, rounds: int = 4, work_dir: Path | None = None) -> SinksRun:
    rounds = max(1, min(rounds, n))
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.perf_counter()
    r = SinksRun(n, concurrency, rounds, command, machine(), started)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-sinks-") as tmp:
        work = work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        say("starting the processes")
        with servers(work) as arms:
            r.tallies = {a.key: ArmTally() for a in arms}
            # what is alive now lives through the run: frozen, the collection before each segment skips it
            gc.collect()
            gc.freeze()
            try:
                say("warming up")
                for arm in arms:
                    asyncio.run(
                        segment(arm, 0, concurrency, warmup_calls(n, concurrency), r.tallies[arm.key])
                    )
                for rnd in range(rounds):
                    count = n // rounds + (1 if rnd < n % rounds else 0)
                    t0 = time.perf_counter()
                    for arm in arms if rnd % 2 == 0 else reversed(arms):
                        tally = r.tallies[arm.key]
                        asyncio.run(segment(arm, count, concurrency, 0, tally))
                        last = sorted(tally.timed.latencies_ms[-count:])
                        caught = (
                            f", sink caught up in {tally.catch_up_s[-1]:.2f} s" if tally.catch_up_s else ""
                        )
                        say(
                            f"  ({arm.key}): p50 {last[len(last) // 2]:.1f} ms, max {last[-1]:.1f} ms"
                            f"{caught}, {tally.failures} failed so far"
                        )
                    say(f"round {rnd + 1}/{rounds} in {time.perf_counter() - t0:.1f} s")
            finally:
                gc.unfreeze()
            for arm in arms:
                r.chained[arm.key] = arm.chained()
                fin = final_count(arm)
                if fin is not None:
                    r.finals[arm.key] = fin
                r.status[arm.key] = sink_status(arm)
    for key, tally in r.tallies.items():
        res = tally.timed.result()
        r.results[key] = LoadResult(
            res.calls, tally.failures, res.seconds, res.latencies_ms, None, res.cpu_ms_per_call
        )
    r.seconds = time.perf_counter() - t_start
    return r


def say(msg: str) -> None:
    print(f"bench.sinks: {msg}", file=sys.stderr, flush=True)


# -- the report ---------------------------------------------------------------------------------


def _ratio(x: float | None, base: float | None) -> str:
    return f"{x / base:.2f}" if x is not None and base else ""


def render(r: SinksRun) -> str:
    failures = r.failures()
    lines = [BEGIN, "### Latest run", ""]
    if failures:
        lines += [
            f"**WARNING: THIS RUN HAD FAILURES ({len(failures)}); its numbers are not to be trusted:**",
            "",
            *(f"- **{f}**" for f in failures),
            "",
        ]
    lines += [
        f"- command: `{r.command}`",
        f"- when: {r.started}; code: {git_revision()}; took {r.seconds / 60:.1f} min",
        f"- machine: {r.machine}",
        f"- N = {r.n} calls per arm (after {warmup_calls(r.n, r.concurrency)} warm-up calls), concurrency "
        f"C = {r.concurrency}, interleaved in {r.rounds} rounds; load generator: raw httpx, 2026-07-28 "
        "stateless `tools/call` of `echo`, every answer checked; one upstream (stateless JSON) behind "
        "four Bastions (identity + policy + SQLite audit, `durability: strict`), one per arm",
        "",
        "| arm | calls/s | ÷ (n) | p50 ms | p99 ms | Bastion CPU ms/call | + after the load | CPU ÷ (n) "
        "| sink caught up after, s (median / max) | in the sink / chained | receiver CPU ms/call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = r.results.get("n")
    base_cpu = base.cpu_ms_per_call.get("bastion") if base else None
    for key, title in ARMS.items():
        res, tally = r.results.get(key), r.tallies.get(key)
        if res is None or tally is None:
            continue
        cpu = res.cpu_ms_per_call.get("bastion", float("nan"))
        after = tally.after_cpu_s / res.calls * 1000 if res.calls else 0.0
        watched = key in ("f", "h")
        catch = (
            f"{statistics.median(tally.catch_up_s):.2f} / {max(tally.catch_up_s):.2f}"
            if watched and tally.catch_up_s
            else ("timed out" if watched else "")
        )
        fin = r.finals.get(key)
        held = (
            "" if fin is None else f"{fin.distinct:,} / {fin.chained:,}" + ("" if fin.ok else " **MISMATCH**")
        )
        recv = res.cpu_ms_per_call.get("receiver")
        cells = [
            f"({key}) {title}",
            f"{res.calls_per_s:,.0f}",
            _ratio(res.calls_per_s, base.calls_per_s if base else None),
            f"{res.p50:.2f}",
            f"{res.p99:.2f}",
            f"{cpu:.2f}",
            f"{after:.2f}" if watched else "",
            _ratio(cpu + after, base_cpu),
            catch,
            held,
            "" if recv is None else f"{recv:.2f}",
        ]
        lines.append(f"| {' | '.join(cells)} |")
    lines += ["", "The sinks at the end (Bastion's `/readyz` and `/metrics`, the sink's own count):", ""]
    for key in ARMS:
        status, failed = r.status.get(key, (None, None))
        if status is None:
            continue
        fin = r.finals.get(key)
        parts = [
            f"state `{status.get('state')}`",
            f"{status.get('delivered', 0):,} delivered",
            f"lag {status.get('lag_records', 0):,} (as the sink last read it)",
            f"{r.chained.get(key, 0):,} chained in the audit DB",
        ]
        if failed is not None:
            parts.append(f"{failed} failed deliveries")
        if status.get("last_error"):
            parts.append(f"last error `{str(status['last_error'])[:120]}`")
        if fin is not None:
            dup = fin.lines - fin.distinct
            parts.append(
                f"{fin.lines:,} lines in the sink ({dup} duplicates){'; ' + fin.note if fin.note else ''}"
            )
        lines.append(f"- ({key}) {ARMS[key]}: " + ", ".join(parts))
    lines += [
        "",
        "How to read: every arm is a Bastion of its own doing the same governed calls to the same "
        "upstream; only `audit.sinks` differs. (n) has none; (f) appends each batch to a local file "
        "and fsyncs it; (h) POSTs each batch as OCSF lines to a separate receiver process; (d) points "
        "at a port nobody listens on, so every delivery is refused and retried with back-off for the "
        "whole run. A sink reads records after they are chained, beside the calls: its cost to them "
        "is Bastion's extra CPU (reading the trail, formatting batches, sending, moving the cursor in "
        'the state DB) while the calls run, plus what remains after the load stops ("+ after the '
        'load": the CPU Bastion spent until the sink held every record, per call; "CPU ÷ (n)" '
        'counts both). "Sink caught up after" is the time from the end of a round\'s calls until '
        "every chained record was in the sink (polled every 10 ms). All processes share the "
        "machine's cores and the machine is shared with other work, so quote the ratios to (n), "
        "measured in the same interleaved rounds, rather than the absolute numbers.",
        END,
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, section: str) -> None:
    """Replace this benchmark's section in `path` (appended under `HEADING` the first time)."""
    replace_section(path, section, BEGIN, END, HEADING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sinks", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000, help="calls per arm (default 2000)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="calls in flight (default 16)")
    p.add_argument("--rounds", type=int, default=4, help="interleaving rounds (default 4)")
    p.add_argument("--work-dir", type=Path, help="keep configs, databases, sink files and logs here")
    p.add_argument("--output", type=Path, default=DOC, help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.n < 1 or args.rounds < 1 or args.concurrency < 1:
        p.error("-n, -c and --rounds must be at least 1")
    command = shlex.join(["python", "-m", "bench.sinks", *(sys.argv[1:] if argv is None else argv)])
    result = run(args.n, args.concurrency, command, rounds=args.rounds, work_dir=args.work_dir)
    section = render(result)
    print(section)
    if not args.no_write:
        write(args.output, section)
        print(f"written to {args.output}", file=sys.stderr)
    if failures := result.failures():
        print("bench.sinks: FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
