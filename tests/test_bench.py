"""The benchmark harness, run with a tiny N so it cannot rot (the real numbers: `python -m bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import harness, llm, memory, report


@pytest.mark.timeout(180)  # ~22 s on an idle 2-core machine; it starts 11 processes at once
def test_harness_runs_end_to_end_and_keeps_the_rest_of_the_document(tmp_path: Path) -> None:
    """The whole interleaved matrix with a tiny N, processes started once: the SDK's default server
    (sessions, SSE) and the stateless one, legacy-session and 2026-07-28 clients, C = 3 and 1, each
    cell with the bare proxy, the like-for-like arm, `intent` and (at C = 3) two workers, plus
    (b) and (c) in the stateless 2026-07-28 cell. Every answer is checked by the run itself."""
    work = tmp_path / "work"
    work.mkdir()
    run = harness.run(
        6,
        3,
        "python -m bench -n 6 -c 3",
        micro_n=20,
        micro_optional=False,
        work_dir=work,
        n_low=2,
        rounds=1,
        warmup=0,
        commits=5,
    )

    a, b = run.scenarios["a"].result, run.scenarios["b"].result
    assert a is not None and b is not None
    assert (a.calls, a.errors, b.calls, b.errors) == (6, 0, 6, 0)
    assert len(b.latencies_ms) == 6 and b.p99 >= b.p50 > 0
    # /proc counts CPU in clock ticks (10 ms): with a few calls a process may not reach one.
    assert set(b.cpu_ms_per_call) == {"load generator", "upstream", "bastion"}
    assert all(v >= 0 for v in b.cpu_ms_per_call.values())
    c = run.scenarios["c"]
    assert c.result is not None or c.note.startswith("not available")
    names = [m.name for m in run.micro]
    assert "JWT verify, cached token" in names
    assert any(m.name.startswith("audit records/s committed, SQLite") and m.value for m in run.micro)

    assert {c.key for c in run.cells} == {
        f"{u}/{e}/c{c}" for u in ("json", "sdk") for e in ("modern", "legacy") for c in (3, 1)
    }
    for cell in run.cells:
        arms = run.arms[cell.key]
        assert arms[:3] == ["a", "p", "b0"] and "i" in arms
        assert ("b0=" in arms) == (cell.client == "legacy")
        assert ("w" in arms) == (cell.concurrency == 3)
        for key in arms:
            res = run.result(cell, key)
            assert res is not None and res.errors == 0
            assert res.calls == (6 if cell.concurrency == 3 else 2)
    assert len(run.commits_ms) == 5 and run.commit_ms > 0
    assert {"Bastion (b0)", "Bastion (i)", "Bastion (w)", "upstream (sdk)"} <= set(run.rss)
    assert all(end > 0 for _, end in run.rss.values())

    # Bastion ran as an operator runs it (`gateway.cli serve`), logging one JSON line per call,
    # through all four upstream entries (auto and legacy, to either server).
    lines = [json.loads(x) for x in (work / "bastion-b.log").read_text().splitlines() if x.startswith("{")]
    calls = [x for x in lines if x.get("logger") == "bastion.calls"]
    assert len(calls) >= 6 and {x["effect"] for x in calls} == {"allow"}
    lines = [json.loads(x) for x in (work / "bastion-b0.log").read_text().splitlines() if x.startswith("{")]
    calls = [x for x in lines if x.get("logger") == "bastion.calls"]
    assert {x["effect"] for x in calls} == {"allow"}
    assert {x.get("upstream") for x in calls} == {"bench", "bench-legacy", "sdk", "sdk-legacy"}

    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "# Benchmarks\n\nintro kept\n\n"
        + report.BEGIN
        + "\nold\n"
        + report.END
        + "\n\n## Budgets\n\nkept too\n"
    )
    section = report.render(run)
    report.write(doc, section)
    text = doc.read_text()
    assert "intro kept" in text and "## Budgets\n\nkept too" in text and "\nold\n" not in text
    assert "| (a) direct to the upstream |" in text and "calls/s ratio" in text
    assert "python -m bench -n 6 -c 3" in text and f"concurrency C = {run.concurrency}" in text
    assert "### The upstreams people run" in text and "| SDK default | legacy | 3 |" in text
    assert "The speed targets" in text and "One durable commit" in text
    verdicts = [x for x in text.splitlines() if x.startswith(("- MET:", "- MISSED:", "- NOT MEASURED:"))]
    assert any("like for like, the SDK's default server, legacy clients" in x for x in verdicts)
    assert any("`intent` added p50" in x for x in verdicts)
    assert any("redaction of a 1 KB text" in x for x in verdicts)


def test_memory_check_judges_growth_against_the_rss_after_1000_calls() -> None:
    """`python -m bench.memory`'s verdict (the check itself, 100,000 calls, is not run in CI)."""
    mb = 2**20
    assert memory.points(100_000) == [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000]
    assert memory.verdict([(1_000, 100 * mb, 1.0), (9_000, 109 * mb, 9.0)]).startswith("- MET")
    assert memory.verdict([(1_000, 100 * mb, 1.0), (9_000, 111 * mb, 9.0)]).startswith("- MISSED")
    assert memory.verdict([(40, 100 * mb, 1.0)]).startswith("- NOT MEASURED")


def test_llm_bench_runs_end_to_end_and_keeps_the_rest_of_the_document(tmp_path: Path) -> None:
    """`python -m bench.llm` with a tiny N, without the redaction path (Presidio's start-up alone
    would take longer than the rest): every answer is checked by the run itself."""
    work = tmp_path / "work"
    work.mkdir()
    run = llm.run(6, 2, "python -m bench.llm -n 6 -c 2", rounds=2, redaction=False, work_dir=work)

    assert [key for key, _ in run.arms] == ["direct", "bastion"]
    for case in llm.CASES:
        for arm in ("direct", "bastion"):
            res = run.results[(case.key, arm)]
            assert (res.calls, res.errors) == (6, 0) and res.p99 >= res.p50 > 0
        assert set(run.results[(case.key, "bastion")].cpu_ms_per_call) == {
            "load generator",
            "provider",
            "bastion",
        }
    assert set(run.ttft) == {("stream", "direct"), ("stream", "bastion")}
    direct, through = run.ttft[("stream", "direct")], run.ttft[("stream", "bastion")]
    assert 0 < direct.p50 < run.results[("stream", "direct")].p50 and through.calls == 6

    # Bastion decided every tool call: the permitted one allowed, the other denied by policy
    lines = [json.loads(x) for x in (work / "bastion.log").read_text().splitlines() if x.startswith("{")]
    calls = [x for x in lines if x.get("logger") == "bastion.calls"]
    assert {x["effect"] for x in calls} == {"allow", "deny"}

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro kept\n")
    llm.write(doc, llm.render(run))
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nintro kept\n\n## LLM API front\n\n" + llm.BEGIN)
    doc.write_text(first + "\n### Findings\n\nkept too\n")
    llm.write(doc, llm.render(run).replace("python -m bench.llm", "python -m bench.llm --again"))
    text = doc.read_text()
    assert text.count(llm.BEGIN) == 1 and text.count("## LLM API front") == 1
    assert "--again" in text and "### Findings\n\nkept too" in text
    assert "| Anthropic Messages, no tool calls | direct to the provider |" in text
