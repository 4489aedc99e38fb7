"""`bastion policy replay` on a large trail: records per second, and peak memory against size.

    python -m bench.replay [--records N] [--small N]

Fills two SQLite audit stores straight through SQLite (the writer would take far longer), one of
`--small` records and one of `--records`, with calls of the demo upstream as a gateway records
them (the `replay` inputs included, a fifth with a redacted argument), then runs
`bastion policy replay` on each in its own process against a candidate that tightens the
transfer limit, and prints the time per record and each process's peak RSS. Constant memory
means the two peaks are about the same whatever the trail's size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from audit.record import AuditRecord
from audit.store import AuditStore

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 1, tzinfo=UTC)
_INSERT = (
    "INSERT INTO audit_records (id, ts, schema_version, instance, user, upstream, tool, action, effect, "
    "status, record) VALUES (?, ?, 2, 'bastion-1', ?, 'demo', ?, 'call_tool', ?, 'completed', ?)"
)


def record(i: int, t0: datetime = T0, step: timedelta = timedelta(milliseconds=1)) -> AuditRecord:
    """The i-th call: four tools, five users, amounts that cross the candidate's new limit."""
    tool = ("transfer", "echo", "add", "read_note")[i % 4]
    args: dict[str, object] = {
        "transfer": {"amount": (i * 37) % 2000, "to": "bob" if i % 5 else "<EMAIL_ADDRESS>"},
        "echo": {"text": f"message {i}"},
        "add": {"a": i, "b": 2},
        "read_note": {"name": "welcome"},
    }[tool]
    allowed = not (tool == "transfer" and (i * 37) % 2000 > 1000)
    verdict = {"effect": "allow" if allowed else "deny", "policy_ids": ["developers-use-demo"]}
    inputs = {"issuer": "bastion-dev", "groups": ["developers"], "roles": [], "scopes": []}
    inputs |= {"has_email": False, "tainted": False, "policy": verdict}
    return AuditRecord(
        id=f"r{i:09d}",
        ts=t0 + step * i,
        instance="bastion-1",
        trace_id=f"{i:032x}",
        call_id=None,
        user=f"user{i % 5}",
        tenant=None,
        agent=None,
        protocol="mcp",
        upstream="demo",
        tool=tool,
        action="call_tool",
        args_redacted=args,
        args_hmac=None,
        decision=verdict | {"reasons": [], "policy_version": "live", "stage": "policy"},
        budget={"charged": [], "exceeded": None},
        pii={"input": {}, "output": {}},
        outcome={"status": "completed", "latency_ms": 1.0, "upstream_status": 200, "error": None},
        result_sha256=None,
        replay=inputs,
    )


def fill(path: Path, n: int, t0: datetime = T0, step: timedelta = timedelta(milliseconds=1)) -> None:
    """n records straight into an audit store made by `AuditStore.open`, from t0 every `step`."""
    db = sqlite3.connect(path)
    try:
        rows = []
        for i in range(n):
            r = record(i, t0, step)
            doc = json.dumps(r.to_json(), separators=(",", ":"))
            ts = r.ts.replace(tzinfo=None).isoformat(" ", "microseconds")
            rows.append((r.id, ts, r.user, r.tool, r.decision["effect"], doc))
            if len(rows) == 20_000:
                db.executemany(_INSERT, rows)
                rows.clear()
        db.executemany(_INSERT, rows)
        db.commit()
    finally:
        db.close()


def measure(work: Path, n: int, candidate: Path) -> tuple[float, int, str]:
    """(seconds, peak RSS KiB, the replay's printed counts) for a trail of n records."""
    db = work / f"audit-{n}.db"
    url = f"sqlite+aiosqlite:///{db}"

    async def create() -> None:
        await (await AuditStore.open(url)).close()

    asyncio.run(create())
    fill(db, n)
    tools = {"transfer": {"risk": "external"}, "delete_note": {"risk": "write"}}
    cfg = {
        "policy": {"dir": str(ROOT / "policies")},
        "audit": {"url": url},
        "upstreams": {"demo": {"url": "http://127.0.0.1:9/mcp", "tools": tools}},
        "data_dir": str(work / "data"),
    }
    (work / "bastion.yaml").write_text(yaml.safe_dump(cfg))
    code = (
        "import resource, sys\n"
        "from gateway.cli import main\n"
        f"rc = main(['policy', 'replay', '--config', {str(work / 'bastion.yaml')!r}, "
        f"'--candidate', {str(candidate)!r}])\n"
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    took = time.perf_counter() - t0
    peak = int(next(line for line in done.stderr.splitlines() if line.startswith("peak")).split()[1])
    return took, peak, done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--small", type=int, default=2_000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        work = Path(tmp)
        candidate = work / "candidate"
        shutil.copytree(ROOT / "policies", candidate, ignore=shutil.ignore_patterns("examples", "tests"))
        demo = (candidate / "demo.cedar").read_text()
        (candidate / "demo.cedar").write_text(
            demo.replace("context.args.amount > 1000", "context.args.amount > 500")
        )
        rows = []
        for n in (args.small, args.records):
            took, peak, out = measure(work, n, candidate)
            rows.append((n, took, peak))
            print(out, file=sys.stderr)
        print("| records | seconds | µs per record | peak RSS MiB |")
        print("|---:|---:|---:|---:|")
        for n, took, peak in rows:
            print(f"| {n} | {took:.1f} | {took / n * 1e6:.0f} | {peak / 1024:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
