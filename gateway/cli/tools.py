"""`bastion tools list|diff|approve|reject UPSTREAM[/TOOL]`: review pinned tool definitions.

These commands work on the state DB (`state.url`) directly; a running gateway sees a decision
within `pinning.refresh_s`. Definitions are shown with non-ASCII characters escaped, so hidden
characters are visible in a review.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import getpass
import json
import sys
from typing import Any

from gateway.config import Config


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    tools = sub.add_parser("tools", help="pinned tool definitions (rug-pull defence)").add_subparsers(
        dest="tools_command", required=True
    )
    ls = tools.add_parser("list", parents=[common], help="pinned tools and their status")
    ls.add_argument("target", nargs="?", metavar="UPSTREAM[/TOOL]")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=cmd_list)
    diff = tools.add_parser(
        "diff", parents=[common], help="what changed since approval, and what the scan flagged"
    )
    diff.add_argument("target", nargs="?", metavar="UPSTREAM[/TOOL]")
    diff.add_argument("--all", action="store_true", help="approved tools too")
    diff.set_defaults(func=cmd_diff)
    for verb, helptext in (
        ("approve", "approve the current definition (all unapproved tools of UPSTREAM without /TOOL)"),
        ("reject", "keep the current definition quarantined"),
    ):
        p = tools.add_parser(verb, parents=[common], help=helptext)
        p.add_argument("target", metavar="UPSTREAM[/TOOL]")
        p.add_argument("--by", default=None, help="who decides (default: the login name)")
        if verb == "approve":
            p.add_argument("--sha", help="approve only if the current definition's sha256 starts with this")
        p.set_defaults(func=cmd_decide, verb=verb)


def _target(arg: str | None) -> tuple[str | None, str | None]:
    if not arg:
        return None, None
    upstream, _, tool = arg.partition("/")
    return upstream, tool or None


async def _with_state(cfg: Config, work: Any) -> Any:
    from gateway.state.db import open_state

    engine = await open_state(cfg.state.url)
    try:
        return await work(engine)
    finally:
        await engine.dispose()


def _config(args: argparse.Namespace) -> Config:
    from gateway.cli import _load, load_or_demo

    return _load(args.config) or load_or_demo(args.config)  # the demo's imports only when needed


def cmd_list(args: argparse.Namespace) -> int:
    from gateway.state.pins import list_pins

    upstream, tool = _target(args.target)
    pins = asyncio.run(_with_state(_config(args), lambda e: list_pins(e, upstream, tool)))
    if args.json:
        for pin in pins:
            print(json.dumps(pin.to_json()))
        return 0
    print(f"{'tool':<40} {'status':<9} {'sha256':<12}  findings")
    for pin in pins:
        kinds = ", ".join(sorted({f.kind for f in pin.findings})) or "-"
        print(f"{pin.ref:<40} {pin.status:<9} {pin.current_sha256[:12]:<12}  {kinds}")
    if not pins:
        print("(no pinned tools: start the gateway, or list its tools through it)")
    return 0


def _pretty(definition: str | None) -> list[str]:
    if definition is None:
        return []
    try:
        return json.dumps(json.loads(definition), indent=2, sort_keys=True, ensure_ascii=True).splitlines()
    except ValueError:
        return definition.splitlines()


def cmd_diff(args: argparse.Namespace) -> int:
    from gateway.state.pins import list_pins

    upstream, tool = _target(args.target)
    pins = asyncio.run(_with_state(_config(args), lambda e: list_pins(e, upstream, tool)))
    shown = [p for p in pins if args.all or tool or not p.usable]
    for pin in shown:
        print(f"== {pin.ref}: {pin.status} (sha256 {pin.current_sha256[:12]}, changed {pin.changed_at})")
        for f in pin.findings:
            print(f"   ! {f.kind} in {f.where}: {f.excerpt}")
        before, after = _pretty(pin.approved_definition), _pretty(pin.current_definition)
        if pin.approved_sha256 == pin.current_sha256:
            print("   (the current definition is the approved one)")
        else:
            label = "approved" if pin.approved_definition else "(never approved)"
            for line in difflib.unified_diff(before, after, label, "current", lineterm=""):
                print(f"   {line}")
        print()
    if not shown:
        print("nothing waits for review" if not tool else f"no pinned tool {args.target}")
        return 0 if not tool else 1
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from gateway.state.pins import approve, list_pins, reject

    upstream, tool = _target(args.target)
    assert upstream is not None
    by = args.by or _login()

    async def work(engine: Any) -> tuple[list[Any], list[Any]]:
        known = await list_pins(engine, upstream, tool)
        if args.verb == "approve":
            done = await approve(engine, upstream, tool, by, args.sha)
        else:
            done = await reject(engine, upstream, tool, by)
        return known, done

    known, done = asyncio.run(_with_state(_config(args), work))
    if not known:
        print(f"bastion: no pinned tool matches {args.target}", file=sys.stderr)
        return 1
    past = "approved" if args.verb == "approve" else "rejected"
    for pin in done:
        print(f"{past} {pin.ref} (sha256 {pin.current_sha256[:12]})")
    if not done:
        if getattr(args, "sha", None) and any(not p.usable for p in known):
            print(f"bastion: the current definition of {args.target} does not match --sha", file=sys.stderr)
            return 1
        print(f"nothing to {args.verb}: {args.target} is already {past}")
    return 0


def _login() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"
