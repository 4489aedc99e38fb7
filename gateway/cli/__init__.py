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
from pathlib import Path

from audit import cli as audit_cli
from audit.cli import AuditSettings
from gateway import config as config_mod
from gateway import logs
from gateway.cli import approvals as approvals_cli
from gateway.cli import budgets as budgets_cli
from gateway.cli import console as console_cli
from gateway.cli import keys as keys_cli
from gateway.cli import policy as policy_cli
from gateway.cli import sinks as sinks_cli
from gateway.cli import tools as tools_cli
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


def load_or_demo(arg: str | None) -> Config:
    """The config named by `--config` (or its defaults), with the demo's when none is found."""
    from gateway.demo import demo_config

    return _load(arg) or demo_config(0, "http://127.0.0.1:0/mcp", Path(".bastion"))


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
        return 0
    logs.setup(cfg.logging.level, cfg.logging.format)
    if args.worker is not None:
        from gateway.workers import instance_of

        audit = cfg.audit.model_copy(update={"instance": instance_of(cfg, args.worker)})
        _run(serve(cfg.model_copy(update={"audit": audit}), reuse_port=True))
    elif cfg.listen.workers > 1:
        from gateway.workers import supervise

        return supervise(cfg, Path(_resolve_config(args.config)).resolve())
    else:
        _run(serve(cfg))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    _run(run_demo(args.port, args.host))
    return 0


def _audit_settings(arg: str | None) -> AuditSettings:
    cfg = _load(arg) or load_or_demo(arg)  # the demo's config (and its imports) only when needed
    key = cfg.audit.signing_key_file or cfg.data_dir / "audit-signing.key"
    return AuditSettings(cfg.audit.url, key, cfg.audit.retention_days)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="config file (default: $BASTION_CONFIG, ./bastion.yaml, or the demo)"
    )
    p = argparse.ArgumentParser(prog="bastion", description="A governance proxy for AI agents.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the gateway")
    s.add_argument("--worker", type=int, help="serve as worker N of `listen.workers` (set by the supervisor)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", parents=[common], help="gateway + demo MCP tool server + example policies")
    d.add_argument("--port", type=int, default=int(os.environ.get("BASTION_PORT", "8080")))
    d.add_argument("--host", default="127.0.0.1")
    d.set_defaults(func=cmd_demo)

    sinks_cli.register(audit_cli.register(sub, common, _audit_settings), common)

    policy_cli.register(sub, common)

    budgets_cli.register(sub, common)
    keys_cli.register(sub, common)
    tools_cli.register(sub, common)
    approvals_cli.register(sub, common)
    console_cli.register(sub, common)
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
