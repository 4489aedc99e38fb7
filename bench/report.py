"""The benchmark's report: printed, and kept in docs/benchmarks.md between markers.

Only the part between `<!-- bench:begin -->` and `<!-- bench:end -->` is replaced, so sections
that others add to docs/benchmarks.md (by hand or by their own harnesses) survive a re-run.
"""

from __future__ import annotations

from pathlib import Path

from bench.harness import ARMS, Cell, Run, git_revision
from bench.load import LoadResult
from bench.profile import markdown as profile_markdown

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
LABELS = {"a": "a", "p": "p", "b0": "b0", "b": "b", "a_kb": "a, 1 KB", "c": "c"}
ORDER = ("a", "p", "b0", "b", "a_kb", "c")
TARGETS = {"p50_ms": 1.0, "p99_ms": 5.0, "ratio": 0.60}
ISSUE = {
    "b0_cpu": 1.6,
    "b_cpu": 1.8,
    "intent_commits": 1,
    "strict_commits": 2,
    "cpu_low_vs_high": 1.3,
    "sdk_ratio": 0.9,
    "redaction_ms_per_kb": 0.5,
}
"""The targets , printed as MET / MISSED from the run's own numbers."""
UPSTREAM_SHORT = {"json": "stateless JSON", "sdk": "SDK default"}


def _row(name: str, res: LoadResult | None, note: str = "") -> str:
    if res is None:
        return f"| {name} | {note} | | | | |"
    return (
        f"| {name} | {res.calls_per_s:,.0f} | {res.p50:.2f} | {res.p95:.2f} | {res.p99:.2f} | {res.calls} |"
    )


def _added(name: str, x: LoadResult | None, base: LoadResult | None) -> list[str]:
    if x is None or base is None:
        return []
    d50, d95, d99 = x.p50 - base.p50, x.p95 - base.p95, x.p99 - base.p99
    ratio = x.calls_per_s / base.calls_per_s
    return [f"| {name} | {d50:+.2f} | {d95:+.2f} | {d99:+.2f} | {ratio:.2f} |"]


def _verdict(run: Run) -> list[str]:
    a, b = run.scenarios["a"].result, run.scenarios["b"].result
    if a is None or b is None:
        return []
    checks = [
        (
            f"p50 added ≤ {TARGETS['p50_ms']} ms",
            b.p50 - a.p50 <= TARGETS["p50_ms"],
            f"{b.p50 - a.p50:+.2f} ms",
        ),
        (
            f"p99 added ≤ {TARGETS['p99_ms']} ms",
            b.p99 - a.p99 <= TARGETS["p99_ms"],
            f"{b.p99 - a.p99:+.2f} ms",
        ),
        (
            f"throughput ≥ {TARGETS['ratio']:.0%} of direct",
            b.calls_per_s / a.calls_per_s >= TARGETS["ratio"],
            f"{b.calls_per_s / a.calls_per_s:.0%}",
        ),
    ]
    out = [f"- {'met' if ok else 'MISSED'}: {what} (measured {got})" for what, ok, got in checks]
    floor = run.scenarios.get("p")
    if floor is not None and floor.result is not None:
        p = floor.result
        out.append(
            f"- for scale, the bare proxy (p), governing nothing: {p.p50 - a.p50:+.2f} ms at p50, "
            f"{p.p99 - a.p99:+.2f} ms at p99, {p.calls_per_s / a.calls_per_s:.0%} of direct"
        )
    return out


def _verdict_line(ok: bool | None, what: str, got: str) -> str:
    word = "NOT MEASURED" if ok is None else "MET" if ok else "MISSED"
    return f"- {word}: {what} ({got})"


def _cpu(res: LoadResult | None) -> float | None:
    return None if res is None else res.cpu_ms_per_call.get("bastion")


def speed_targets(run: Run) -> list[str]:
    """The targets  (deliverables 1-3), each MET / MISSED from this run's numbers."""
    out: list[str] = []
    base = run.baseline
    p_cpu = _cpu(run.result(base, "p"))
    for key, limit in (("b0", ISSUE["b0_cpu"]), ("b", ISSUE["b_cpu"])):
        cpu = _cpu(run.result(base, key))
        if key == "b" and not run.budgets:
            continue
        what = f"Bastion CPU per call ({key}) ≤ {limit}x the bare proxy's (p), {_cell_short(base)}"
        if cpu is None or not p_cpu:
            out.append(_verdict_line(None, what, "not run"))
        else:
            ratio = cpu / p_cpu
            out.append(_verdict_line(ratio <= limit, what, f"{cpu:.2f} vs {p_cpu:.2f} ms: {ratio:.2f}x"))
    commit = run.commit_ms
    lows = [c for c in run.cells if c.concurrency == run.c_low and c.concurrency != run.concurrency]
    for cell in lows:
        a, p = run.result(cell, "a"), run.result(cell, "p")
        if a is None or p is None:
            continue
        floor = p.p50 - a.p50
        for key, mode, k in (
            (cell.like, "strict", ISSUE["strict_commits"]),
            ("i", "intent", ISSUE["intent_commits"]),
        ):
            res = run.result(cell, key)
            what = (
                f"`{mode}` added p50 ≤ the bare proxy's + {k} durable commit{'s' if k > 1 else ''}, "
                f"{_cell_short(cell)} ({key})"
            )
            if res is None:
                out.append(_verdict_line(None, what, "not run"))
                continue
            added, limit = res.p50 - a.p50, floor + k * commit
            got = f"{added:+.2f} ms against {floor:+.2f} + {k} x {commit:.2f} = {limit:+.2f} ms"
            out.append(_verdict_line(added <= limit, what, got))
    for cell in lows:
        high = Cell(cell.upstream, cell.client, run.concurrency)
        low_cpu, high_cpu = _cpu(run.result(cell, cell.like)), _cpu(run.result(high, cell.like))
        what = (
            f"Bastion CPU per call at C = {cell.concurrency} ≤ {ISSUE['cpu_low_vs_high']}x that at "
            f"C = {run.concurrency}, {UPSTREAM_SHORT[cell.upstream]}, {cell.client} ({cell.like})"
        )
        if low_cpu is None or not high_cpu:
            out.append(_verdict_line(None, what, "not run"))
            continue
        ratio = low_cpu / high_cpu
        got = f"{low_cpu:.2f} vs {high_cpu:.2f} ms: {ratio:.2f}x"
        out.append(_verdict_line(ratio <= ISSUE["cpu_low_vs_high"], what, got))
    for era in ("legacy", "modern"):
        cell = Cell("sdk", era, run.concurrency)
        a, like = run.result(cell, "a"), run.result(cell, cell.like)
        what = (
            f"≥ {ISSUE['sdk_ratio']} of direct calls/s like for like, the SDK's default server, "
            f"{era} clients, C = {run.concurrency} ({cell.like})"
        )
        if a is None or like is None:
            if run.cells != [base]:
                out.append(_verdict_line(None, what, "not run"))
            continue
        ratio = like.calls_per_s / a.calls_per_s
        got = f"{like.calls_per_s:,.0f} vs {a.calls_per_s:,.0f} calls/s: {ratio:.2f}"
        if era == "legacy" and (auto := run.result(cell, "b0")) is not None:
            got += f"; unconfigured (b0, 2026-07-28 to the upstream): {auto.calls_per_s / a.calls_per_s:.2f}"
        out.append(_verdict_line(ratio >= ISSUE["sdk_ratio"], what, got))
    red = run.redaction
    what = f"redaction of a 1 KB text ≤ {ISSUE['redaction_ms_per_kb']} ms per KB"
    if red is None:
        out.append(_verdict_line(None, what, "measured with the micro-benchmarks; not run"))
    else:
        got = (
            f"{red.us_per_kb / 1000:.2f} ms per KB, {red.found} entities found; one `re` e-mail scan "
            f"of the same text: {red.regex_us_per_kb:.1f} µs per KB, so {red.ratio:,.0f}x a plain regex scan"
        )
        out.append(_verdict_line(red.us_per_kb / 1000 <= ISSUE["redaction_ms_per_kb"], what, got))
    return out


def _cell_short(cell: Cell) -> str:
    return f"{UPSTREAM_SHORT[cell.upstream]}, {cell.client} clients, C = {cell.concurrency}"


def _ms(value: float) -> str:
    return f"{value:.2f}"


def matrix(run: Run) -> list[str]:
    """The interleaved run over upstreams, clients and concurrencies, one row per arm."""
    if len(run.cells) <= 1:
        return []
    lines = [
        "### The upstreams people run",
        "",
        f"Every cell's arms ran interleaved in the same {run.rounds} rounds as the table above; N = "
        f"{run.n} calls per arm at C = {run.concurrency}, {run.n_low} at C = {run.c_low}. Arms: "
        + "; ".join(f"({k}) {v}" for k, v in ARMS.items() if k in ("a", "p", "b0", "b0=", "i", "w"))
        + ". (b0) speaks to the upstream in whatever era `protocol: auto` finds (2026-07-28 for both "
        'servers here); for 2026-07-28 clients that is like for like already. "added" subtracts (a)\'s '
        'percentiles, "÷ a" divides throughputs, CPU is ms per call per process, and "÷ p" divides '
        "Bastion's CPU per call by the bare proxy's in the same cell.",
        "",
        "| upstream | clients | C | arm | calls/s | p50 ms | p99 ms | added p50 | added p99 | ÷ a "
        "| CPU load gen | CPU upstream | CPU Bastion / proxy | ÷ p |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in run.cells:
        a, p = run.result(cell, "a"), run.result(cell, "p")
        first = True
        for key in run.arms.get(cell.key, []):
            res = run.result(cell, key)
            if res is None or key in ("a_kb", "c", "b"):
                continue
            head = (
                f"| {UPSTREAM_SHORT[cell.upstream]} | {cell.client} | {cell.concurrency} "
                if first
                else "| | | "
            )
            first = False
            cpu = res.cpu_ms_per_call
            added = (
                f"{res.p50 - a.p50:+.2f} | {res.p99 - a.p99:+.2f} | {res.calls_per_s / a.calls_per_s:.2f}"
                if a is not None and key != "a"
                else " | | "
            )
            own = cpu.get("bastion")
            floor = _cpu(p)
            over_p = f"{own / floor:.2f}" if own is not None and floor and key not in ("a", "p") else ""
            cells = [f"{cpu[k]:.2f}" if k in cpu else "" for k in ("load generator", "upstream", "bastion")]
            lines.append(
                f"{head}| ({key}) | {res.calls_per_s:,.0f} | {_ms(res.p50)} | {_ms(res.p99)} | {added} "
                f"| {' | '.join(cells)} | {over_p} |"
            )
    return lines


def memory_table(run: Run) -> list[str]:
    if not run.rss:
        return []
    lines = [
        "",
        "Resident memory (RSS, MB) of each process, after start-up and warm-up, and after the run "
        "(Bastion (w): the supervisor and its two workers summed, shared pages counted in each):",
        "",
        "| process | after warm-up | after the run |",
        "|---|---:|---:|",
    ]
    for name, (start, end) in run.rss.items():
        lines.append(f"| {name} | {start / 2**20:,.0f} | {end / 2**20:,.0f} |")
    return lines


def render(run: Run) -> str:
    sc = run.scenarios
    lines = [
        BEGIN,
        "## Latest run",
        "",
        f"- command: `{run.command}`",
        f"- when: {run.started}; code: {git_revision()}",
        f"- machine: {run.machine}",
        f"- N = {run.n} calls per scenario (after a warm-up), concurrency C = {run.concurrency}; "
        "load generator (raw httpx, 2026-07-28 stateless `tools/call` of `echo`) on the same machine",
        *(
            [
                f"- interleaved in {run.rounds} rounds with the other upstreams, clients and concurrencies "
                f"(below); the whole run took {run.seconds / 60:.1f} min"
            ]
            if len(run.cells) > 1
            else []
        ),
        "",
        f"The stateless JSON server, 2026-07-28 clients, C = {run.concurrency}:",
        "",
        "| scenario | calls/s | p50 ms | p95 ms | p99 ms | calls |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in ORDER:
        if key in sc:
            s = sc[key]
            lines.append(_row(f"({LABELS[key]}) {s.title}", s.result, s.note))
    lines += [
        "",
        "| added by Bastion | p50 ms | p95 ms | p99 ms | calls/s ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    if "p" in sc:
        lines += _added("p - a (any proxy on this stack, governing nothing)", sc["p"].result, sc["a"].result)
    if "b0" in sc:
        lines += _added("b0 - a (no budgets)", sc["b0"].result, sc["a"].result)
    lines += _added("b - a", sc["b"].result, sc["a"].result)
    if "p" in sc:
        lines += _added("b - p (governance over the bare proxy)", sc["b"].result, sc["p"].result)
    if "a_kb" in sc:
        lines += _added("c - a (1 KB argument both)", sc["c"].result, sc["a_kb"].result)
    lines += [
        "",
        "CPU time per call, by process (ms; the three share the machine's cores):",
        "",
        "| scenario | load generator | upstream | Bastion (p: the bare proxy) |",
        "|---|---:|---:|---:|",
    ]
    for key in ORDER:
        res = sc[key].result if key in sc else None
        if res is not None:
            cpu = res.cpu_ms_per_call
            cells = [f"{cpu[k]:.2f}" if k in cpu else "" for k in ("load generator", "upstream", "bastion")]
            lines.append(f"| ({LABELS[key]}) | {' | '.join(cells)} |")
    lines += ["", f"Targets at C = {run.concurrency} (set for C = 16) on this machine:", "", *_verdict(run)]
    if run.cells and len(run.cells) > 1:
        lines += ["", *matrix(run)]
    lines += memory_table(run)
    if run.commits_ms:
        ordered = sorted(run.commits_ms)
        on = f", on {run.commit_fs}" if run.commit_fs else ""
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        lines += [
            "",
            f"One durable commit (SQLite, WAL, `synchronous=FULL`, one row; {len(ordered)} commits spread "
            f"over the rounds, next to the audit databases{on}): "
            f"p50 {run.commit_ms:.2f} ms, p90 {p90:.2f} ms.",
        ]
    lines += ["", "The speed targets, from this run:", "", *speed_targets(run)]
    lines.append(
        "- memory (RSS after 100,000 calls within 10% of RSS after 1,000): `python -m bench.memory`, "
        "not part of this run (see below)"
    )
    if run.notes:
        lines += ["", *(f"- {note}" for note in run.notes)]
    if run.micro:
        lines += ["", "### Micro-benchmarks", "", "| what | result |", "|---|---|"]
        lines += [f"| {m.name} | {m.text()} |" for m in run.micro]
    for key, prof in run.profiles.items():
        if prof is not None:
            path, summary = prof
            lines += [
                "",
                f"### Profile of Bastion during ({LABELS[key]})",
                "",
                f"py-spy collapsed stacks: `{path}`",
                "",
            ]
            lines.append(profile_markdown(summary))
    lines.append(END)
    return "\n".join(lines) + "\n"


HEADER = """# Benchmarks

What Bastion costs on top of a direct call to the same MCP server, measured by `python -m bench`
(or `make bench`). See "How to read and re-run" at the end.

"""


def write(path: Path, section: str) -> None:
    """Replace the generated section in `path`, keeping everything around it."""
    replace_section(path, section, BEGIN, END)


def replace_section(path: Path, section: str, begin: str, end: str, heading: str | None = None) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) in place of the one in `path`,
    keeping everything around it; the first time, append it (under `heading`, if given)."""
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + section
    path.write_text(text)
