"""`bastion approvals list|show|approve|deny ID [--reason]`: decide held calls from a shell.

These commands work on the state DB (`state.url`) directly, as an operator with access to it:
unlike the HTTP API they consult no token and no Cedar policy (the OS account is the credential;
the decision is recorded as `cli:<login>` unless `--by` says otherwise). A running gateway sees a
decision at the agent's next attempt. Decisions are written to the audit trail under their own
instance name (`<host>/approvals-cli/<pid>`), so they never interleave with a gateway's chain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import Config


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    cmds = sub.add_parser("approvals", help="human approvals of held calls").add_subparsers(
        dest="approvals_command", required=True
    )
    ls = cmds.add_parser("list", parents=[common], help="approval requests, newest first")
    ls.add_argument("--status", choices=["pending", "approved", "denied", "expired", "consumed"])
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=cmd_list)
    show = cmds.add_parser("show", parents=[common], help="one request, as JSON")
    show.add_argument("id")
    show.set_defaults(func=cmd_show)
    for verb, helptext in (("approve", "let the held call run once"), ("deny", "refuse the held call")):
        p = cmds.add_parser(verb, parents=[common], help=helptext)
        p.add_argument("id")
        p.add_argument("--reason", help="why (recorded, and shown to the agent on a denial)")
        p.add_argument("--by", default=None, help="who decides (default: cli:<login name>)")
        p.set_defaults(func=cmd_decide, verb=verb)


def _config(args: argparse.Namespace) -> Config:
    from gateway.cli import _load, load_or_demo

    return _load(args.config) or load_or_demo(args.config)


async def _with_approvals(cfg: Config, work: Callable[[Any], Awaitable[Any]], audited: bool = False) -> Any:
    from audit.store import AuditStore, AuditStoreError
    from audit.writer import AuditWriter
    from gateway.errors import ConfigError
    from gateway.state.approvals import Approvals
    from gateway.state.db import open_state

    engine = await open_state(cfg.state.url)
    store = writer = None
    try:
        if audited:
            try:
                store = await AuditStore.open(cfg.audit.url)
            except AuditStoreError as exc:
                raise ConfigError(f"audit.url: {exc}") from exc
            writer = AuditWriter(store)
            await writer.start()
        instance = f"{socket.gethostname()}/approvals-cli/{os.getpid()}"
        approvals = Approvals(
            engine, cfg.approvals, cfg.listen.base_url, audit=writer, instance=instance, protocol="cli"
        )
        try:
            return await work(approvals)
        finally:
            await approvals.aclose()
    finally:
        if writer is not None:
            await writer.close()
        if store is not None:
            await store.close()
        await engine.dispose()


def cmd_list(args: argparse.Namespace) -> int:
    items = asyncio.run(_with_approvals(_config(args), lambda a: a.list(args.status), audited=True))
    if args.json:
        for item in items:
            print(json.dumps(item.to_json()))
        return 0
    print(f"{'id':<36}  {'status':<9} {'user':<20} {'tool':<30} expires")
    for a in items:
        row = a.to_json()
        tool = f"{a.upstream}/{a.tool}"
        print(f"{a.id:<36}  {row['status']:<9} {a.subject[:20]:<20} {tool:<30} {row['expires_at']}")
    if not items:
        print("(no approval requests)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    found = asyncio.run(_with_approvals(_config(args), lambda a: a.get(args.id)))
    if found is None:
        print(f"bastion: no approval {args.id!r}", file=sys.stderr)
        return 1
    print(json.dumps(found.to_json(), indent=2))
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from gateway.errors import ApprovalError

    by = args.by or _login()

    async def work(approvals: Any) -> Any:
        return await approvals.decide(args.id, args.verb == "approve", by, args.reason)

    try:
        decided = asyncio.run(_with_approvals(_config(args), work, audited=True))
    except ApprovalError as err:
        print(f"bastion: {err.message}", file=sys.stderr)
        return 1
    print(f"{decided.status} {decided.id}: {decided.upstream}/{decided.tool} for {decided.subject}")
    return 0


def _login() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"
