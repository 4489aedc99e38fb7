"""Compliance export of the audit trail, streamed so the size of the store does not matter."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from typing import TextIO, Unpack

from audit.store import AuditStore, RecordFilters

FORMATS = ("jsonl",)


async def export_jsonl(store: AuditStore, out: TextIO, **filters: Unpack[RecordFilters]) -> int:
    """Write one `to_json()` object per line in (ts, id) order; return how many were written."""
    n = 0
    async for record in store.iter_records(**filters):
        out.write(json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")))
        out.write("\n")
        n += 1
    return n


def run_export(
    url: str,
    fmt: str,
    output: str | None,
    *,
    since: datetime | None,
    until: datetime | None,
    user: str | None,
    tool: str | None,
    effect: str | None,
    status: str | None,
) -> int:
    """Export to `output` (stdout when None or "-"); return the number of records.

    A file appears under its final name only when complete: a failed export leaves no
    truncated file that could pass for the whole trail.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt} is not supported yet; use jsonl")
    filters: RecordFilters = {
        "since": since,
        "until": until,
        "user": user,
        "tool": tool,
        "effect": effect,
        "status": status,
    }
    if output is None or output == "-":
        return asyncio.run(_export(url, sys.stdout, filters))
    partial = f"{output}.partial"
    try:
        with open(partial, "w", encoding="utf-8", newline="\n") as out:
            n = asyncio.run(_export(url, out, filters))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, output)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    return n


async def _export(url: str, out: TextIO, filters: RecordFilters) -> int:
    store = await AuditStore.open(url, create=False)
    try:
        return await export_jsonl(store, out, **filters)
    finally:
        await store.close()
