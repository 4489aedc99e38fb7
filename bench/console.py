"""The console on a large trail: how long each page takes with N records in the audit store.

    python -m bench.console [--records N] [--runs R]

Fills an SQLite audit store straight through SQLite with N calls spread over the last 24 hours
(the records of `bench.replay`: four tools, five users, a share of denials), starts `bastion serve`
on it in its own process, and times each console page as an admin's script would load it (Bearer
token, one request at a time, R runs each after one warm-up): the overview (24 hourly counts, top
denied tools), the first audit page, a page deep in the trail (its key taken from the middle), the
search filters on an indexed column (user, decision, target + tool), a filter that matches nothing
(agent), the policy-id filter (no index: narrowed by the record text, at most 5,000 rows checked a
page), one call's story, and the live tail's poll. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import yaml

from audit.store import AuditStore
from bench import processes
from bench.replay import ROOT, fill
from gateway.identity.devkeys import DEV_ISSUER, ensure_dev_key


def pages(n: int, mid_key: str, some_id: str) -> list[tuple[str, str, dict[str, str]]]:
    return [
        ("overview (last 24 h)", "/console", {}),
        ("audit, newest page", "/console/audit", {}),
        (f"audit, a page {n // 2:,} records deep", "/console/audit", {"before": mid_key}),
        ("filter: user", "/console/audit", {"user": "user3"}),
        ("filter: decision deny", "/console/audit", {"decision": "deny"}),
        ("filter: target + tool", "/console/audit", {"target": "demo", "tool": "transfer"}),
        ("filter: agent, no match", "/console/audit", {"agent": "nobody"}),
        ("filter: policy id (no index)", "/console/audit", {"policy": "developers-use-demo"}),
        ("one call's story", f"/console/calls/{some_id}", {}),
        ("live tail poll", "/console/audit/tail", {"after": mid_key}),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args(argv)
    n = args.records
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        work = Path(tmp)
        db = work / "audit.db"
        url = f"sqlite+aiosqlite:///{db}"

        async def create() -> None:
            await (await AuditStore.open(url)).close()

        asyncio.run(create())
        t0 = time.perf_counter()
        start = datetime.now(UTC) - timedelta(hours=24)
        fill(db, n, start, timedelta(hours=24) / n)
        print(f"filled {n:,} records in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        data = work / "data"
        key = ensure_dev_key(data)
        port = processes.free_port()
        base = f"http://127.0.0.1:{port}"
        tools = {"transfer": {"risk": "external"}, "delete_note": {"risk": "write"}}
        cfg = {
            "listen": {"host": "127.0.0.1", "port": port},
            "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data / "dev-jwks.json")}]},
            "policy": {"dir": str(ROOT / "policies")},
            "audit": {"url": url, "instance": "bench-console"},
            "state": {"url": f"sqlite+aiosqlite:///{work / 'state.db'}"},
            "upstreams": {"demo": {"url": "http://127.0.0.1:9/mcp", "tools": tools}},
            "admin": {"groups": ["admins"]},
            "data_dir": str(data),
        }
        (work / "bastion.yaml").write_text(yaml.safe_dump(cfg))
        proc = processes.Proc(
            "bastion",
            [str(ROOT / ".venv" / "bin" / "bastion"), "serve", "--config", str(work / "bastion.yaml")],
            work / "bastion.log",
        )
        try:
            processes.wait_ready(proc, f"{base}/healthz", (200,), timeout=120)
            token = key.mint("bench-admin", groups=["admins"], audience=base)
            mid = f"{(start + timedelta(hours=12)).isoformat()},r{n // 2:09d}"
            rows = []
            with httpx.Client(
                base_url=base, headers={"authorization": f"Bearer {token}"}, timeout=60
            ) as http:
                for title, path, params in pages(n, mid, f"r{n // 3:09d}"):
                    r = http.get(path, params=params)
                    if r.status_code != 200:
                        raise SystemExit(f"{title}: HTTP {r.status_code}: {r.text[:300]}")
                    times = []
                    for _ in range(args.runs):
                        t = time.perf_counter()
                        r = http.get(path, params=params)
                        times.append((time.perf_counter() - t) * 1000)
                        assert r.status_code == 200, (title, r.status_code)
                    rows.append((title, statistics.median(times), max(times), len(r.content)))
        finally:
            proc.stop()
    print(
        f"{n:,} records over the last 24 h, SQLite; `python -m bench.console --records {n}`; "
        f"median and max of {args.runs} loads\n"
    )
    print("| page | median ms | max ms | bytes |")
    print("|---|---:|---:|---:|")
    for title, med, mx, size in rows:
        print(f"| {title} | {med:.1f} | {mx:.1f} | {size:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
