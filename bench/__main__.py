"""`python -m bench [-n N] [-c C] [--no-micro] [--profile FILE] [--no-write]`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench import harness, report

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description="Bastion vs. direct, side by side.")
    p.add_argument("-n", type=int, default=2000, help="calls per scenario (default 2000)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="calls in flight (default 16)")
    p.add_argument("--no-micro", action="store_true", help="skip the micro-benchmarks")
    p.add_argument(
        "--profile", type=Path, help="sample Bastion with py-spy during (b); collapsed stacks to FILE"
    )
    p.add_argument(
        "--output", type=Path, default=DOC, help="markdown file to update (default docs/benchmarks.md)"
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.n < 1 or args.concurrency < 1:
        p.error("-n and -c must be at least 1")
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    run = harness.run(args.n, args.concurrency, command, micro=not args.no_micro, profile=args.profile)
    section = report.render(run)
    print(section)
    if not args.no_write:
        report.write(args.output, section)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
