"""One benchmark run: direct vs. through Bastion, side by side, interleaved, plus micro-benchmarks.

The upstreams people run, the clients they run, and two concurrencies (`Cell`: one of each):

- upstream `json`: the SDK's `MCPServer` stateless, answering JSON (the cheapest way to run it);
  `sdk`: the same server with the SDK's defaults (sessions, SSE answers to session clients);
- clients `modern` (2026-07-28, stateless) and `legacy` (initialize, `Mcp-Session-Id`, SSE
  answers where the server sends them), see `bench.load`;
- concurrency C (default 16) and C_low (default 1).

In each cell, arms (`ARMS`): (a) direct to the upstream; (p) a bare forwarding proxy on Bastion's
HTTP stack, no governance (`bench.passthrough`: the floor any proxy written this way stands on);
(b0) Bastion with identity + policy + audit, `protocol: auto` to the upstream (what it does
unconfigured: it finds 2026-07-28 and speaks it, whatever the client speaks); for legacy clients
(b0=) the same told to speak the client's era to the upstream (`protocol: legacy`), so the
upstream does the same work as in (a); (i) the like-for-like arm with `audit.durability: intent`;
(w) the like-for-like arm with `listen.workers: 2` (at C only). In the stateless-JSON /
2026-07-28 cell at C, as before: (b) (b0) plus a budget on every call, (c) (b) plus redaction of
a 1 KB argument, compared with (a, 1 KB).

Every server runs in its own process, all started once; the load generator runs in this one. The
N calls of every arm are split into rounds; each round runs every cell's arms in turn (their
order alternating between rounds), so a noisy neighbour or a drifting machine lands on all arms
alike. CPU per call is read from /proc around the timed segments only (warm-up and session
set-up excluded). One durable SQLite commit is measured in every round, next to the audit
databases (`bench.targets.commit_ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import processes, targets
from bench.load import LEGACY, MODERN, LoadResult, drive
from bench.micro import Micro, run_all
from bench.profile import Profile, summarize
from gateway.identity.devkeys import ensure_dev_key

SMALL_ARGS = {"text": "hello"}
PROFILE_RATE = 500
UPSTREAM_KINDS = ("json", "sdk")
CLIENT_ERAS = ("modern", "legacy")
UPSTREAM_TITLES = {
    "json": "stateless JSON server (`json_response`, `stateless_http`)",
    "sdk": "the SDK's default server (sessions, SSE)",
}
CLIENT_TITLES = {"modern": "2026-07-28 stateless clients", "legacy": "legacy-session clients"}
ROUTES = {
    ("json", "auto"): processes.UPSTREAM,
    ("json", "legacy"): "bench-legacy",
    ("sdk", "auto"): "sdk",
    ("sdk", "legacy"): "sdk-legacy",
}
"""Bastion's upstream entries: (upstream kind, `protocol`) -> name (every Bastion has all four)."""
ARMS = {
    "a": "direct to the upstream",
    "p": "a bare Python proxy on Bastion's stack (the floor, no governance)",
    "b0": "Bastion: identity + policy + audit",
    "b0=": "(b0) like for like: `protocol: legacy` to the upstream",
    "i": "like for like, `audit.durability: intent`",
    "w": "like for like, `listen.workers: 2`",
    "b": "Bastion: identity + policy + budget + audit",
    "a_kb": "direct, 1 KB argument",
    "c": "(b) + redaction of a 1 KB argument",
}


def kilobyte_args() -> dict[str, str]:
    """A 1 KB argument with an e-mail address and a phone number in it, for the redaction run."""
    text = "Please forward the invoice to jane.doe@example.com or call +1 415 555 0123. "
    filler = "The quarterly figures are attached for review by the finance team. "
    while len(text) < 1024:
        text += filler
    return {"text": text[:1024]}


@dataclass(frozen=True)
class Cell:
    upstream: str
    """json | sdk"""
    client: str
    """modern | legacy"""
    concurrency: int

    @property
    def key(self) -> str:
        return f"{self.upstream}/{self.client}/c{self.concurrency}"

    @property
    def title(self) -> str:
        return f"{UPSTREAM_TITLES[self.upstream]}, {CLIENT_TITLES[self.client]}, C = {self.concurrency}"

    @property
    def like(self) -> str:
        """The arm that speaks the client's era to the upstream with the default durability."""
        return "b0=" if self.client == "legacy" else "b0"


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
    """The stateless-JSON / 2026-07-28 cell at C: (a), (p), (b0), (b), (a, 1 KB), (c)."""
    micro: list[Micro] = field(default_factory=list)
    profiles: dict[str, tuple[Path, Profile] | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    n_low: int = 0
    c_low: int = 1
    rounds: int = 1
    cells: list[Cell] = field(default_factory=list)
    arms: dict[str, list[str]] = field(default_factory=dict)
    """Cell key -> its arms, in order."""
    results: dict[tuple[str, str], LoadResult] = field(default_factory=dict)
    """(cell key, arm) -> what it measured over all rounds."""
    commits_ms: list[float] = field(default_factory=list)
    commit_fs: str = ""
    rss: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Process -> RSS bytes (after start-up and warm-up, after the run)."""
    redaction: targets.RedactionSpeed | None = None
    budgets: bool = True
    skipped: dict[str, str] = field(default_factory=dict)
    """Arm -> why it did not run."""
    seconds: float = 0.0

    @property
    def baseline(self) -> Cell:
        return Cell("json", "modern", self.concurrency)

    def result(self, cell: Cell, arm: str) -> LoadResult | None:
        return self.results.get((cell.key, arm))

    @property
    def commit_ms(self) -> float:
        return statistics.median(self.commits_ms) if self.commits_ms else float("nan")


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


# -- the arms and their processes ---------------------------------------------------------------


@dataclass
class Arm:
    key: str
    url: str
    token: str | None
    pids: dict[str, int]
    """"upstream", and "bastion" (the bare proxy for (p)): whose CPU is read."""
    tree: bool = False
    """Bastion is a supervisor with workers: read the CPU of the whole process tree."""
    args: dict[str, str] = field(default_factory=lambda: SMALL_ARGS)

    def cpu(self) -> dict[str, float]:
        return {
            name: processes.cpu_seconds(pid, self.tree and name == "bastion")
            for name, pid in self.pids.items()
        }


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def add(self, res: LoadResult) -> None:
        self.latencies_ms += res.latencies_ms
        self.seconds += res.seconds
        for name, ms in res.cpu_ms_per_call.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + ms * res.calls / 1000

    def result(self) -> LoadResult:
        n = len(self.latencies_ms)
        cpu = {k: v / n * 1000 for k, v in self.cpu_s.items()} if n else {}
        return LoadResult(n, 0, self.seconds, self.latencies_ms, None, cpu)


def _segment(cell: Cell, arm: Arm, n: int, warmup: int = 0) -> LoadResult:
    client = LEGACY if cell.client == "legacy" else MODERN
    res = asyncio.run(
        drive(arm.url, arm.token, arm.args, n, cell.concurrency, warmup, client, None if warmup else arm.cpu)
    )
    if res.errors:
        where = "warm-up" if warmup else "run"
        raise RuntimeError(
            f"{cell.key} ({arm.key}, {where}): {res.errors} of {res.calls} calls failed; "
            f"first: {res.first_error}"
        )
    return res


def _cells(concurrency: int, c_low: int, matrix: bool) -> list[Cell]:
    if not matrix:
        return [Cell("json", "modern", concurrency)]
    levels = [concurrency] + ([c_low] if c_low != concurrency else [])
    return [Cell(u, e, c) for c in levels for u in UPSTREAM_KINDS for e in CLIENT_ERAS]


def _arms_of(cell: Cell, baseline: Cell, have: set[str], matrix: bool) -> list[str]:
    out = ["a", "p", "b0"]
    if cell.client == "legacy":
        out.append("b0=")
    if matrix and "i" in have:
        out.append("i")
    if matrix and "w" in have and cell.concurrency > 1 and cell.concurrency == baseline.concurrency:
        out.append("w")
    if cell == baseline:
        out += [k for k in ("b", "a_kb", "c") if k in have]
    return out


def _bastion_cfg(base: dict[str, Any], work: Path, name: str, **changes: Any) -> dict[str, Any]:
    """`base` on a port of its own, with databases and data_dir of its own (processes run at once)."""
    own = work / name
    own.mkdir(exist_ok=True)
    cfg = {
        **base,
        "listen": {**base["listen"], "port": processes.free_port()},
        "audit": {**base["audit"], "url": f"sqlite+aiosqlite:///{own / 'audit.db'}"},
        "state": {"url": f"sqlite+aiosqlite:///{own / 'state.db'}"},
        "data_dir": str(own),
    }
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return cfg


@contextlib.contextmanager
def _servers(
    work: Path, run: Run, matrix: bool, redaction: bool
) -> Iterator[tuple[dict[tuple[str, str], Arm], dict[str, int]]]:
    """Start every process the run needs (at once: they import the same heavy packages); yield the
    arms by (upstream kind, arm key) for the modern and (key + "/legacy") the legacy client, and
    the processes whose RSS the report shows (name -> pid)."""
    kinds = UPSTREAM_KINDS if matrix else ("json",)
    with contextlib.ExitStack() as stack:
        ups = {k: stack.enter_context(processes.upstream(work, k, ready=False)) for k in kinds}
        proxies = {
            k: stack.enter_context(
                processes.passthrough(
                    work, ups[k][1], "passthrough" if k == "json" else f"passthrough-{k}", False
                )
            )
            for k in kinds
        }
        routes = {
            name: {"url": ups[kind][1], "protocol": protocol}
            for (kind, protocol), name in ROUTES.items()
            if kind in kinds
        }
        base, refused = processes.gateway_config(work, ups["json"][1], processes.free_port(), routes)
        configs: dict[str, dict[str, Any]] = {"b0": _bastion_cfg(base, work, "bastion-b0")}
        if matrix:
            if refused["intent"] is None:
                configs["i"] = _bastion_cfg(base, work, "bastion-i", audit={"durability": "intent"})
            else:
                run.notes.append(f"audit.durability: intent not in this build ({refused['intent']})")
            configs["w"] = _bastion_cfg(base, work, "bastion-w", listen={"workers": 2})
        if refused["budgets"] is None:
            configs["b"] = _bastion_cfg(base, work, "bastion-b", budgets=processes.BUDGETS)
        else:
            run.notes.append(f"budgets: not in this build, so (b) runs without them ({refused['budgets']})")
            run.budgets = False
            configs["b"] = _bastion_cfg(base, work, "bastion-b")
        if not redaction:
            run.skipped["c"] = "not run (--no-redaction)"
        elif refused["redaction"] is None:
            configs["c"] = _bastion_cfg(base, work, "bastion-c", redaction=processes.REDACTION)
            if "budgets" in configs["b"]:
                configs["c"]["budgets"] = processes.BUDGETS
        else:
            run.skipped["c"] = "not available: this build has no redaction"
            run.notes.append(f"redaction: not in this build ({refused['redaction']})")
        started = {
            key: stack.enter_context(processes.bastion(work, cfg, f"bastion-{key}", ready=False))
            for key, cfg in configs.items()
        }
        for kind in kinds:  # all started: now wait for each (Bastion reaches its upstreams per call)
            processes.wait_mcp(*ups[kind], 120)
            processes.wait_mcp(*proxies[kind], 120)
        for key, (proc, _) in started.items():
            processes.wait_bastion(proc, f"http://127.0.0.1:{configs[key]['listen']['port']}", 180)

        key_pair = ensure_dev_key(work)
        tokens: dict[tuple[int, str], str] = {}

        def route(key: str, kind: str, protocol: str) -> tuple[str, str]:
            port = configs[key]["listen"]["port"]
            name = ROUTES[(kind, protocol)]
            url = f"http://127.0.0.1:{port}/mcp/{name}"
            if (port, name) not in tokens:
                tokens[(port, name)] = key_pair.mint("bench", audience=url, groups=["bench"])
            return url, tokens[(port, name)]

        arms: dict[tuple[str, str], Arm] = {}
        for kind in kinds:
            up = {"upstream": ups[kind][0].pid}
            for era in CLIENT_ERAS:
                sfx = "" if era == "modern" else "/legacy"
                like = "legacy" if era == "legacy" else "auto"
                arms[(kind, "a" + sfx)] = Arm("a", ups[kind][1], None, up)
                arms[(kind, "p" + sfx)] = Arm(
                    "p", proxies[kind][1], None, {**up, "bastion": proxies[kind][0].pid}
                )
                b0 = started["b0"][0].pid
                arms[(kind, "b0" + sfx)] = Arm("b0", *route("b0", kind, "auto"), {**up, "bastion": b0})
                arms[(kind, "b0=" + sfx)] = Arm("b0=", *route("b0", kind, like), {**up, "bastion": b0})
                for key in ("i", "w"):
                    if key in started:
                        pids = {**up, "bastion": started[key][0].pid}
                        arms[(kind, key + sfx)] = Arm(key, *route(key, kind, like), pids, key == "w")
        up = {"upstream": ups["json"][0].pid}
        arms[("json", "b")] = Arm("b", *route("b", "json", "auto"), {**up, "bastion": started["b"][0].pid})
        arms[("json", "a_kb")] = Arm("a_kb", ups["json"][1], None, up, args=kilobyte_args())
        if "c" in started:
            pids = {**up, "bastion": started["c"][0].pid}
            arms[("json", "c")] = Arm("c", *route("c", "json", "auto"), pids, args=kilobyte_args())

        watched = {f"upstream ({k})": ups[k][0].pid for k in kinds}
        watched |= {f"bare proxy ({k})": proxies[k][0].pid for k in kinds}
        watched |= {f"Bastion ({key})": proc.pid for key, (proc, _) in started.items()}
        yield arms, watched


@contextlib.contextmanager
def _frozen() -> Iterator[None]:
    """What is alive now lives through the run: frozen, the full collection `bench.load.drive`
    makes before each timed segment skips it (~100 ms a segment otherwise, 200 segments a run)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _rss(pids: dict[str, int]) -> dict[str, int]:
    return {name: processes.rss_bytes(pid, tree=name == "Bastion (w)") for name, pid in pids.items()}


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
    matrix: bool = True,
    n_low: int | None = None,
    c_low: int = 1,
    rounds: int = 4,
    redaction: bool = True,
    commits: int = 50,
    warmup: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Run:
    """`work_dir` keeps configs, databases and process logs (default: a temporary directory).

    `n` calls per arm at `concurrency`, `n_low` (default n // 4) at `c_low`; `matrix=False` runs
    the stateless-JSON / 2026-07-28 cell at `concurrency` only (the run before the matrix).
    `warmup`: uncounted calls per arm before the rounds (default: a tenth of its calls, at least
    C, at most 200)."""
    t_start = time.perf_counter()
    n_low = max(1, n // 4) if n_low is None else n_low
    rounds = max(1, min(rounds, n, n_low))
    r = Run(n, concurrency, command, machine(), datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    r.n_low, r.c_low, r.rounds = n_low, c_low, rounds
    say = progress or (lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        work = work_dir or Path(tmp)
        probe = work / "commit-probe"
        r.commit_fs = targets.filesystem_of(work)
        say("starting the processes")
        with _servers(work, r, matrix, redaction) as (arms, rss_pids), _frozen():
            have = {key for (_, key) in arms}
            r.cells = _cells(concurrency, c_low, matrix)
            r.arms = {cell.key: _arms_of(cell, r.baseline, have, matrix) for cell in r.cells}

            def arm_of(cell: Cell, key: str) -> Arm:
                return arms[(cell.upstream, key + ("/legacy" if cell.client == "legacy" else ""))]

            def count(cell: Cell, rnd: int) -> int:
                total = n if cell.concurrency == concurrency else n_low
                return total // rounds + (1 if rnd < total % rounds else 0)

            say("warming up")
            for cell in r.cells:
                total = n if cell.concurrency == concurrency else n_low
                warm = min(200, max(total // 10, cell.concurrency)) if warmup is None else warmup
                for key in r.arms[cell.key] if warm else ():
                    _segment(cell, arm_of(cell, key), 0, warm)
            rss_start = _rss(rss_pids)
            tallies = {(cell.key, key): Tally() for cell in r.cells for key in r.arms[cell.key]}
            for rnd in range(rounds):
                say(f"round {rnd + 1} of {rounds}")
                r.commits_ms += targets.commit_ms(probe, commits)
                for cell in r.cells:
                    order = r.arms[cell.key]
                    for key in order if rnd % 2 == 0 else reversed(order):
                        tallies[(cell.key, key)].add(_segment(cell, arm_of(cell, key), count(cell, rnd)))
            rss_end = _rss(rss_pids)
            r.rss = {name: (rss_start[name], rss_end[name]) for name in rss_pids}
            r.results = {k: t.result() for k, t in tallies.items()}
            base = r.baseline
            for key in ("a", "p", "b0", "b", "a_kb", "c"):
                res = r.result(base, key)
                if res is not None or key == "c":
                    note = "" if res is not None else r.skipped.get(key, "not run")
                    r.scenarios[key] = Scenario(key, ARMS[key], res, note)
            if "b" in r.scenarios and not r.budgets:
                r.scenarios["b"].title = ARMS["b0"]
            if profile is not None:
                say("profiling")
                for key in ("b0", "b", "c"):
                    if key in r.arms[base.key]:
                        r.profiles[key] = _profile(base, arm_of(base, key), n, profile, key)
    if micro:
        say("micro-benchmarks")
        r.micro = run_all(concurrency, micro_n, micro_optional)
        if micro_optional and redaction:
            r.redaction = targets.redaction_speed()
    r.seconds = time.perf_counter() - t_start
    return r


def _profile(cell: Cell, arm: Arm, n: int, profile: Path, tag: str) -> tuple[Path, Profile]:
    """A pass of `n` calls of one arm sampled by py-spy (after the measured rounds, so sampling
    costs the measured numbers nothing); CPU per call read in the same pass."""
    out = profile.with_name(f"{profile.stem}-{tag}{profile.suffix}")
    with processes.profiled(arm.pids["bastion"], out, PROFILE_RATE):
        res = _segment(cell, arm, n)
    return out, summarize(out, n, PROFILE_RATE, res.cpu_ms_per_call["bastion"] * 1000)


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
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=processes.REPO,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" + uncommitted changes" if dirty else "")
