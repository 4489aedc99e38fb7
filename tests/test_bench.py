"""The benchmark harness, run with a tiny N so it cannot rot (the real numbers: `python -m bench`)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import harness, report


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
