"""`python -m bench [-n N] [-c C] [--n-low N] [--c-low C] [--rounds R] [--no-matrix] [--no-micro]
[--no-redaction] [--profile FILE] [--no-write]`; the memory test is `python -m bench.memory`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench import harness, report

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description="Bastion vs. direct, side by side.")
    p.add_argument("-n", type=int, default=2000, help="calls per arm at concurrency C (default 2000)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="calls in flight (default 16)")
    p.add_argument(
        "--n-low", type=int, default=500, help="calls per arm at the low concurrency (default 500)"
    )
    p.add_argument("--c-low", type=int, default=1, help="the low concurrency (default 1)")
    p.add_argument("--rounds", type=int, default=4, help="interleaving rounds (default 4)")
    p.add_argument(
        "--no-matrix",
        action="store_true",
        help="only the stateless JSON server with 2026-07-28 clients at C (no SDK default server, "
        "no legacy clients, no low concurrency, no intent or workers arms)",
    )
    p.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    p.add_argument("--no-redaction", action="store_true", help="skip scenario (c) and the redaction target")
    p.add_argument(
        "--profile",
        type=Path,
        help="sample Bastion with py-spy during (b0), (b), (c); collapsed stacks to FILE",
    )
    p.add_argument(
        "--output", type=Path, default=DOC, help="markdown file to update (default docs/benchmarks.md)"
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if min(args.n, args.concurrency, args.n_low, args.c_low, args.rounds) < 1:
        p.error("-n, -c, --n-low, --c-low and --rounds must be at least 1")
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    run = harness.run(
        args.n,
        args.concurrency,
        command,
        micro=not args.no_micro,
        profile=args.profile,
        matrix=not args.no_matrix,
        n_low=args.n_low,
        c_low=args.c_low,
        rounds=args.rounds,
        redaction=not args.no_redaction,
        progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True),
    )
    section = report.render(run)
    print(section)
    if not args.no_write:
        report.write(args.output, section)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
