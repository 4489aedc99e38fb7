"""Does Bastion's memory stay flat over many calls? `python -m bench.memory [-n 100000] [-c 8]`.

One Bastion process (`bastion serve`, SQLite audit and state, a budget per user) in front of the
SDK's default server (`bench.upstream sdk`: sessions, SSE), driven with N governed `tools/call`s
that vary everything a cache could keep:

- every call's arguments differ (a counter in the text), so no two argument hashes are equal;
- three calls in four are 2026-07-28 calls that carry a new `_meta["bastion/call_id"]` each (an
  idempotency key Bastion claims and remembers);
- one in four comes from a legacy-session client through an upstream entry with
  `protocol: legacy`, so each Bastion session has its own upstream session; every agent opens a
  new session every `--renew` calls, deleting the old one or (every other time) just leaving it,
  as a client that dies would;
- every `--chunk` calls come from a new user (a new token, a new principal, a new budget counter).

Bastion's RSS (from /proc) is printed after 1,000 calls and at points up to N; the check is that
RSS after N calls is within 10% of RSS after 1,000 (). Not part of CI: 100,000 calls take
minutes. Nothing is written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import processes
from bench.harness import machine
from bench.load import Client, drive
from gateway.identity.devkeys import ensure_dev_key

LIMIT = 0.10
"""RSS after N calls may exceed RSS after 1,000 by at most this share."""
POINTS = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000)


def points(n: int) -> list[int]:
    return sorted({p for p in POINTS if p < n} | {n})


def run(
    n: int,
    concurrency: int = 8,
    chunk: int = 500,
    renew: int = 10,
    work_dir: Path | None = None,
    say: Callable[[str], None] = print,
) -> list[tuple[int, int, float]]:
    """Drive `n` calls; (calls so far, Bastion's RSS in bytes, seconds so far) at each point."""
    out: list[tuple[int, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="bastion-memory-") as tmp:
        work = work_dir or Path(tmp)
        with processes.upstream(work, "sdk") as (_up, upstream_url):
            port = processes.free_port()
            routes = {
                "sdk": {"url": upstream_url},
                "sdk-legacy": {"url": upstream_url, "protocol": "legacy"},
            }
            cfg, refused = processes.gateway_config(work, upstream_url, port, routes)
            if refused["budgets"] is None:
                cfg["budgets"] = [{**processes.BUDGETS[0], "match": {"tools": ["*"]}}]
            key = ensure_dev_key(work)
            base = f"http://127.0.0.1:{port}/mcp"
            modern = Client(call_ids=True, vary=True)
            legacy = Client("legacy", vary=True, renew_every=renew)
            args = {"text": "memory check"}
            with processes.bastion(work, cfg, "bastion-memory") as (proc, _):
                done, started, wanted = 0, time.perf_counter(), points(n)
                user = 0
                while done < n:
                    user += 1
                    size = min(chunk, n - done)
                    # not past the next point: its RSS is read after exactly that many calls
                    size = min(size, next(p for p in wanted if p > done) - done)
                    tokens = {
                        name: key.mint(f"user-{user}", audience=f"{base}/{name}", groups=["bench"])
                        for name in routes
                    }
                    legacy_n = size // 4
                    modern_n = size - legacy_n
                    for url, token, count, client in (
                        (f"{base}/sdk", tokens["sdk"], modern_n, modern),
                        (f"{base}/sdk-legacy", tokens["sdk-legacy"], legacy_n, legacy),
                    ):
                        if count:
                            res = asyncio.run(
                                drive(url, token, args, count, min(concurrency, count), 0, client)
                            )
                            if res.errors:
                                raise RuntimeError(f"{res.errors} of {count} calls failed: {res.first_error}")
                    done += size
                    if done in wanted:
                        rss = processes.rss_bytes(proc.pid)
                        elapsed = time.perf_counter() - started
                        out.append((done, rss, elapsed))
                        say(f"{done:>9,} calls  RSS {rss / 2**20:7.1f} MB  ({done / elapsed:,.0f} calls/s)")
    return out


def verdict(points_rss: list[tuple[int, int, float]]) -> str:
    first = next((rss for calls, rss, _ in points_rss if calls == 1_000), None)
    last_calls, last, _ = points_rss[-1]
    if first is None or last_calls <= 1_000:
        return "- NOT MEASURED: RSS after N calls within 10% of RSS after 1,000 (N must exceed 1,000)"
    growth = last / first - 1
    word = "MET" if growth <= LIMIT else "MISSED"
    return (
        f"- {word}: Bastion's RSS after {last_calls:,} calls within {LIMIT:.0%} of its RSS after 1,000 "
        f"({first / 2**20:.1f} → {last / 2**20:.1f} MB, {growth:+.1%})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=100_000, help="governed calls (default 100000)")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="calls in flight (default 8)")
    p.add_argument("--chunk", type=int, default=500, help="calls per user (default 500)")
    p.add_argument("--renew", type=int, default=10, help="legacy calls per session (default 10)")
    args = p.parse_args(argv)
    if min(args.n, args.concurrency, args.chunk, args.renew) < 1:
        p.error("-n, -c, --chunk and --renew must be at least 1")
    print(f"machine: {machine()}")
    print(f"N = {args.n:,} calls at C = {args.concurrency}; a new user every {args.chunk} calls")
    result = run(args.n, args.concurrency, args.chunk, args.renew)
    print()
    print("| calls | Bastion RSS MB | vs 1,000 calls |")
    print("|---:|---:|---:|")
    first = next((rss for calls, rss, _ in result if calls == 1_000), None)
    for calls, rss, _ in result:
        rel = f"{rss / first - 1:+.1%}" if first else ""
        print(f"| {calls:,} | {rss / 2**20:.1f} | {rel} |")
    print()
    print(verdict(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
