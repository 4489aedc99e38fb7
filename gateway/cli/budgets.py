"""`bastion budgets show [--user U]`: current-window usage of every configured budget."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from gateway.config import Config
from gateway.errors import ConfigError


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    budgets = sub.add_parser("budgets", help="budget usage").add_subparsers(
        dest="budgets_command", required=True
    )
    show = budgets.add_parser("show", parents=[common], help="usage in the current window")
    show.add_argument(
        "--user", help="only counters of this user: a subject of the first issuer, or ISSUER#SUBJECT"
    )
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(func=cmd_show)


async def _usage(cfg: Config, user: str | None) -> list[dict[str, Any]]:
    from gateway.stages.budget import usage
    from gateway.state.db import open_state

    engine = await open_state(cfg.state.url)
    try:
        return await usage(engine, cfg.budgets, user)
    finally:
        await engine.dispose()


def cmd_show(args: argparse.Namespace) -> int:
    from gateway.cli import load_or_demo

    cfg = load_or_demo(args.config)
    if not cfg.budgets:
        print("no budgets are configured")
        return 0
    try:
        user = None if args.user is None else cfg.identity.identities().resolve(args.user)
    except ValueError as exc:
        raise ConfigError(f"--user: {exc}") from None
    rows = asyncio.run(_usage(cfg, user))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'budget':<24} {'subject':<40} {'used':>10} {'limit':>10}  resets at")
    for r in rows:
        print(f"{r['budget']:<24} {r['subject']:<40} {r['used']:>10} {r['limit']:>10}  {r['resets_at']}")
    if not rows:
        print("(nothing used in the current windows)")
    return 0
