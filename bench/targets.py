"""What the benchmark's targets are measured against, in the same run: one durable SQLite commit,
and redaction's speed next to a plain regular-expression scan of the same text.

- `commit_ms`: one SQLite commit in WAL mode with `synchronous=FULL` (as the audit store commits),
  one ~300-byte row per transaction, in a directory next to Bastion's audit databases (so on the
  same filesystem). The time is mostly the `fdatasync` of the WAL.
- `redaction_speed`: µs per KB to scan `bench.redaction.payload(1024)` (the micro-benchmark's 1 KB
  text) with the scanner Bastion builds, and the same text scanned by Python's `re` with one
  simple e-mail pattern: what any scan of 1 KB costs in this interpreter at the least.
"""

from __future__ import annotations

import re
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


def filesystem_of(path: Path) -> str:
    """The mount point and type of the filesystem `path` is on (from /proc/mounts), or ''."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    real = str(path.resolve())
    best = ("", "")
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return f"{best[1]} at {best[0]}" if best[0] else ""


def commit_ms(directory: Path, n: int = 50) -> list[float]:
    """Milliseconds of each of `n` durable commits of one row (WAL, synchronous=FULL) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(directory / "commit-probe.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS record (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        body = "x" * 300
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO record (body) VALUES (?)", (body,))
            conn.execute("COMMIT")
            out.append((time.perf_counter() - t0) * 1000)
        return out
    finally:
        conn.close()


@dataclass(frozen=True)
class RedactionSpeed:
    us_per_kb: float
    """Bastion's scanner, median µs per KB of the 1 KB payload."""
    regex_us_per_kb: float
    """One e-mail regex over the same text, median µs per KB."""
    found: int
    """Entities the scanner found in the payload (it did scan)."""

    @property
    def ratio(self) -> float:
        return self.us_per_kb / self.regex_us_per_kb if self.regex_us_per_kb else float("nan")


def redaction_speed(repeat: int = 100) -> RedactionSpeed:
    """Bastion's redaction scan of a 1 KB payload vs. a plain `re` scan of its text (medians)."""
    from bench.redaction import _scanner, payload
    from gateway.redaction.walk import scan_json

    scanner = _scanner(None)
    value = payload(1024)
    text = value["content"][0]["text"]
    kb = len(text.encode()) / 1024
    scan_json(scanner, value, 4096)  # warm: compiled patterns, caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        scan_json(scanner, value, 4096)
        times.append(time.perf_counter() - t0)
    regex = []
    for _ in range(repeat * 10):
        t0 = time.perf_counter()
        EMAIL.findall(text)
        regex.append(time.perf_counter() - t0)
    _, findings = scanner.find(text)
    return RedactionSpeed(
        statistics.median(times) * 1e6 / kb, statistics.median(regex) * 1e6 / kb, len(findings)
    )
