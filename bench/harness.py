"""One benchmark run: direct vs. through Bastion, side by side, plus micro-benchmarks.

(a) the upstream directly; (p) a bare forwarding proxy on Bastion's HTTP stack, no governance
(`bench.passthrough`: the floor any proxy written this way stands on); (b) Bastion with identity +
policy (+ budgets when this build has them) + audit; (c) (b) plus redaction of a 1 KB argument,
when this build has redaction. Every server runs in its own process; the load generator runs in
this one.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench import processes
from bench.load import LoadResult, drive
from bench.micro import Micro, run_all
from bench.profile import Profile, summarize
from gateway.identity.devkeys import ensure_dev_key

SMALL_ARGS = {"text": "hello"}
PROFILE_RATE = 500


def kilobyte_args() -> dict[str, str]:
    """A 1 KB argument with an e-mail address and a phone number in it, for the redaction run."""
    text = "Please forward the invoice to jane.doe@example.com or call +1 415 555 0123. "
    filler = "The quarterly figures are attached for review by the finance team. "
    while len(text) < 1024:
        text += filler
    return {"text": text[:1024]}


@dataclass
class Scenario:
    key: str
    title: str
    result: LoadResult | None = None
    note: str = ""


@dataclass
class Run:
    n: int
    concurrency: int
    command: str
    machine: str
    started: str
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    micro: list[Micro] = field(default_factory=list)
    profiles: dict[str, tuple[Path, Profile] | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {system}"


def _load(
    url: str, token: str | None, args: dict[str, str], n: int, c: int, pids: dict[str, int]
) -> LoadResult:
    """Drive the load and note how much CPU each process spent per call (warm-up included)."""
    before = {name: processes.cpu_seconds(pid) for name, pid in pids.items()}
    own = time.process_time()
    result = asyncio.run(drive(url, token, args, n, c, warmup=min(200, max(n // 10, c))))
    calls = n + min(200, max(n // 10, c))
    result.cpu_ms_per_call["load generator"] = (time.process_time() - own) / calls * 1000
    for name, pid in pids.items():
        result.cpu_ms_per_call[name] = (processes.cpu_seconds(pid) - before[name]) / calls * 1000
    if result.errors:
        raise RuntimeError(f"{result.errors} of {result.calls} calls failed; first: {result.first_error}")
    return result


def _gateway(
    work: Path,
    cfg: dict[str, object],
    name: str,
    upstream_pid: dict[str, int],
    scenario: Scenario,
    token: str,
    n: int,
    concurrency: int,
    profile: Path | None,
    tag: str,
    args: dict[str, str] = SMALL_ARGS,
) -> tuple[Path, Profile] | None:
    """Run one scenario against a fresh Bastion process; sampled by py-spy when `profile` is set."""
    with processes.bastion(work, cfg, name) as (proc, url):
        pids = {**upstream_pid, "bastion": proc.pid}
        if profile is None:
            scenario.result = _load(url, token, args, n, concurrency, pids)
            return None
        out = profile.with_name(f"{profile.stem}-{tag}{profile.suffix}")
        with processes.profiled(proc.pid, out, PROFILE_RATE):
            scenario.result = _load(url, token, args, n, concurrency, pids)
    assert scenario.result is not None
    return out, summarize(out, n, PROFILE_RATE, scenario.result.cpu_ms_per_call["bastion"] * 1000)


def run(
    n: int,
    concurrency: int,
    command: str,
    *,
    micro: bool = True,
    micro_n: int = 2000,
    micro_optional: bool = True,
    profile: Path | None = None,
    work_dir: Path | None = None,
) -> Run:
    """`work_dir` keeps configs, databases and process logs (default: a temporary directory)."""
    r = Run(n, concurrency, command, machine(), datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        work = work_dir or Path(tmp)
        with processes.upstream(work) as (up, upstream_url):
            up_pid = {"upstream": up.pid}
            port = processes.free_port()
            cfg, refused = processes.gateway_config(work, upstream_url, port)
            key = ensure_dev_key(work)
            token = key.mint(
                "bench", audience=f"http://127.0.0.1:{port}/mcp/{processes.UPSTREAM}", groups=["bench"]
            )

            a = Scenario("a", "direct to the upstream")
            a.result = _load(upstream_url, None, SMALL_ARGS, n, concurrency, up_pid)
            r.scenarios["a"] = a

            p = Scenario("p", "a bare Python proxy on Bastion's stack (the floor, no governance)")
            with processes.passthrough(work, upstream_url) as (proxy, proxy_url):
                p.result = _load(
                    proxy_url, None, SMALL_ARGS, n, concurrency, {**up_pid, "bastion": proxy.pid}
                )
            r.scenarios["p"] = p

            spine = Scenario("b0", "Bastion: identity + policy + audit")
            if refused["budgets"] is None:
                r.profiles["b0"] = _gateway(
                    work, cfg, "bastion-b0", up_pid, spine, token, n, concurrency, profile, "b0"
                )
                r.scenarios["b0"] = spine
                cfg = {**cfg, "budgets": processes.BUDGETS}
                b = Scenario("b", "Bastion: identity + policy + budget + audit")
            else:
                r.notes.append(f"budgets: not in this build, so (b) runs without them ({refused['budgets']})")
                b = Scenario("b", spine.title)
            r.profiles["b"] = _gateway(work, cfg, "bastion-b", up_pid, b, token, n, concurrency, profile, "b")
            r.scenarios["b"] = b

            c = Scenario("c", "(b) + redaction of a 1 KB argument")
            if refused["redaction"] is None:
                a_kb = Scenario("a_kb", "direct, 1 KB argument")
                a_kb.result = _load(upstream_url, None, kilobyte_args(), n, concurrency, up_pid)
                r.scenarios["a_kb"] = a_kb
                ccfg = {**cfg, "redaction": processes.REDACTION}
                r.profiles["c"] = _gateway(
                    work, ccfg, "bastion-c", up_pid, c, token, n, concurrency, profile, "c", kilobyte_args()
                )
            else:
                c.note = "not available: this build has no redaction"
                r.notes.append(f"redaction: not in this build ({refused['redaction']})")
            r.scenarios["c"] = c
    if micro:
        r.micro = run_all(concurrency, micro_n, micro_optional)
    return r


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=processes.REPO,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=processes.REPO,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")
