"""`bastion audit sinks [status] [--json]`: where each audit sink stands in each instance chain.

Read from the state DB (cursors, leases, last errors, written by whichever replica delivers) and
the audit store (chain heads), so it works beside a running fleet or with none running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

from gateway.config import Config


def register(audit: Any, common: argparse.ArgumentParser) -> None:
    s = audit.add_parser("sinks", parents=[common], help="each audit sink's lag and last error")
    s.add_argument("what", nargs="?", choices=["status"], default="status")
    s.add_argument("--json", action="store_true", help="one JSON object per sink and chain")
    s.set_defaults(func=cmd_status)


def _when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


async def status_rows(cfg: Config) -> list[dict[str, Any]]:
    """One row per configured sink and instance chain (and per cursor of a sink no longer configured)."""
    from audit.store import AuditStore
    from gateway.state.db import open_state
    from gateway.state.sink_cursors import SinkCursors

    store = await AuditStore.open(cfg.audit.url, create=False)
    engine = await open_state(cfg.state.url)
    try:
        instances = await store.instances()
        heads = {i: await store.last_seq(i) for i in instances}
        cursors = {(c.sink, c.instance): c for c in await SinkCursors(engine, "").all()}
    finally:
        await engine.dispose()
        await store.close()
    now = time.time()
    configured = {s.name: s for s in cfg.audit.sinks}
    rows = []
    for name in [*configured, *sorted({s for s, _ in cursors} - configured.keys())]:
        sink = configured.get(name)
        for instance in instances:
            c = cursors.get((name, instance))
            seq = c.seq if c else 0
            rows.append(
                {
                    "sink": name,
                    "type": sink.type if sink else "(not configured)",
                    "format": sink.format if sink else None,
                    "instance": instance,
                    "delivered_seq": seq,
                    "head_seq": heads[instance],
                    "lag_records": max(0, heads[instance] - seq),
                    "holder": c.holder if c and c.lease_until > now else None,
                    "delivered": c.delivered if c else 0,
                    "last_delivery": _when(c.delivered_at) if c else None,
                    "last_error": c.error if c else None,
                    "last_error_at": _when(c.error_at) if c else None,
                    "alarm": bool(sink and heads[instance] - seq > sink.max_lag_records),
                }
            )
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.cli import load_or_demo

    cfg = load_or_demo(args.config)
    if not cfg.audit.sinks:
        print("no audit sinks are configured (audit.sinks)")
    rows = asyncio.run(status_rows(cfg))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        return 0
    print(f"{'sink':<16} {'type':<8} {'instance':<20} {'delivered':>10} {'head':>10} {'lag':>8}  "
          f"{'held by':<20} last delivery / last error")  # fmt: skip
    for r in rows:
        alarm = "  BACKLOG" if r["alarm"] else ""
        error = f"  error at {r['last_error_at']}: {r['last_error']}" if r["last_error"] else ""
        print(
            f"{r['sink']:<16} {r['type']:<8} {r['instance']:<20} {r['delivered_seq']:>10} "
            f"{r['head_seq']:>10} {r['lag_records']:>8}  {r['holder'] or '-':<20} "
            f"{r['last_delivery'] or 'never'}{alarm}{error}"
        )
    return 0
