"""The benchmark's report: printed, and kept in docs/benchmarks.md between markers.

Only the part between `<!-- bench:begin -->` and `<!-- bench:end -->` is replaced, so sections
that others add to docs/benchmarks.md (by hand or by their own harnesses) survive a re-run.
"""

from __future__ import annotations

from pathlib import Path

from bench.harness import Run, git_revision
from bench.load import LoadResult
from bench.profile import markdown as profile_markdown

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
LABELS = {"a": "a", "p": "p", "b0": "b0", "b": "b", "a_kb": "a, 1 KB", "c": "c"}
ORDER = ("a", "p", "b0", "b", "a_kb", "c")
TARGETS = {"p50_ms": 1.0, "p99_ms": 5.0, "ratio": 0.60}


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
    text = path.read_text() if path.exists() else HEADER
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
