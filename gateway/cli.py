"""The `bastion` command. Every command takes `--config PATH`.

Config resolution: `--config`, else `$BASTION_CONFIG`, else `./bastion.yaml`, else the built-in
demo config (the word `demo` also names it explicitly).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from gateway import config as config_mod
from gateway.config import Config
from gateway.errors import ConfigError

DEMO = "demo"


def _resolve_config(arg: str | None) -> str:
    if arg:
        return arg
    if env := os.environ.get("BASTION_CONFIG"):
        return env
    return "bastion.yaml" if Path("bastion.yaml").exists() else DEMO


def _load(arg: str | None) -> Config | None:
    """The config to use, or None for the built-in demo."""
    path = _resolve_config(arg)
    return None if path == DEMO else config_mod.load(Path(path))


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import serve
    from gateway.demo import run_demo

    cfg = _load(args.config)
    if cfg is None:
        _run(run_demo(int(os.environ.get("BASTION_PORT", "8080"))))
    else:
        _run(serve(cfg))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    _run(run_demo(args.port, args.host))
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    from audit.export import run_export
    from gateway.demo import demo_config

    cfg = _load(args.config) or demo_config(0, "http://127.0.0.1:0/mcp", Path(".bastion"))
    count = run_export(
        cfg.audit.url,
        args.format,
        args.output,
        since=args.since,
        until=args.until,
        user=args.user,
        tool=args.tool,
        effect=args.effect,
        status=args.status,
    )
    if args.output:
        print(f"exported {count} records to {args.output}", file=sys.stderr)
    return 0


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from gateway.stages.policy import PolicyEngine

    cfg = _load(args.config)
    policy = cfg.policy if cfg else config_mod.PolicyConfig()
    if args.dir:
        policy = policy.model_copy(update={"dir": Path(args.dir), "schema_file": None})
    try:
        engine = PolicyEngine.load(policy)
    except ConfigError as err:
        print(err.message, file=sys.stderr)
        return 1
    for warning in engine.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: policy set {engine.version} in {policy.dir} ({len(engine.policies)} policies)")
    return 0


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="config file (default: $BASTION_CONFIG, ./bastion.yaml, or the demo)"
    )
    p = argparse.ArgumentParser(prog="bastion", description="A governance proxy for AI agents.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the gateway")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", parents=[common], help="gateway + demo MCP tool server + example policies")
    d.add_argument("--port", type=int, default=int(os.environ.get("BASTION_PORT", "8080")))
    d.add_argument("--host", default="127.0.0.1")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command", required=True)
    e = a.add_parser("export", parents=[common], help="export audit records")
    e.add_argument("--format", default="jsonl", choices=["jsonl", "csv", "ocsf"])
    e.add_argument("-o", "--output", help="file to write (default: stdout)")
    e.add_argument("--since", type=_timestamp)
    e.add_argument("--until", type=_timestamp)
    e.add_argument("--user")
    e.add_argument("--tool", help="UPSTREAM/TOOL or TOOL")
    e.add_argument("--effect", choices=["allow", "deny", "transform", "approval_required"])
    e.add_argument("--status")
    e.set_defaults(func=cmd_audit_export)

    pol = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command", required=True)
    v = pol.add_parser("validate", parents=[common], help="parse and schema-validate every policy")
    v.add_argument("dir", nargs="?")
    v.set_defaults(func=cmd_policy_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "mcp.server.streamable_http_manager"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"bastion: {err.message}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"bastion: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
