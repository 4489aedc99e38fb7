"""The benchmark harness, run with a tiny N so it cannot rot (the real numbers: `python -m bench`)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import harness, llm, report


def test_harness_runs_end_to_end_and_keeps_the_rest_of_the_document(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    run = harness.run(8, 4, "python -m bench -n 8 -c 4", micro_n=20, micro_optional=False, work_dir=work)

    a, b = run.scenarios["a"].result, run.scenarios["b"].result
    assert a is not None and b is not None
    assert (a.calls, a.errors, b.calls, b.errors) == (8, 0, 8, 0)
    assert len(b.latencies_ms) == 8 and b.p99 >= b.p50 > 0
    # /proc counts CPU in clock ticks (10 ms): with 16 calls a process may not reach one.
    assert set(b.cpu_ms_per_call) == {"load generator", "upstream", "bastion"}
    assert all(v >= 0 for v in b.cpu_ms_per_call.values())
    c = run.scenarios["c"]
    assert c.result is not None or c.note.startswith("not available")
    names = [m.name for m in run.micro]
    assert "JWT verify, cached token" in names
    assert any(m.name.startswith("audit records/s committed, SQLite") and m.value for m in run.micro)

    # Bastion ran as an operator runs it (`gateway.cli serve`), logging one JSON line per call.
    lines = [json.loads(x) for x in (work / "bastion-b.log").read_text().splitlines() if x.startswith("{")]
    calls = [x for x in lines if x.get("logger") == "bastion.calls"]
    assert len(calls) >= 8 and {x["effect"] for x in calls} == {"allow"}

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
    assert "python -m bench -n 8 -c 4" in text and f"concurrency C = {run.concurrency}" in text


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
