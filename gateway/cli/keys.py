"""`bastion keys create|list|revoke`: API keys for service agents, kept hashed in the state database.

`create` prints the key once; only its SHA-256 is stored. `create --config-entry` stores nothing
and prints an `identity.api_keys` entry to paste into the config instead (for deployments that
keep every credential in config management).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config
from gateway.identity.apikeys import ApiKey, ApiKeyStore, from_config, new_key


def _config(args: argparse.Namespace) -> Config:
    from gateway.cli import _load
    from gateway.demo import demo_config

    cfg = _load(args.config)
    if cfg is None:
        Path(".bastion").mkdir(mode=0o700, exist_ok=True)
        cfg = demo_config(0, "http://127.0.0.1:0/mcp", Path(".bastion"))
    return cfg


def _expiry(args: argparse.Namespace) -> datetime | None:
    if args.expires_in_days is None:
        return None
    return (datetime.now(UTC) + timedelta(days=args.expires_in_days)).replace(microsecond=0)


def cmd_create(args: argparse.Namespace) -> int:
    expires = _expiry(args)
    if args.config_entry:
        key, prefix, sha = new_key()
        entry: dict[str, Any] = {"prefix": prefix, "sha256": sha, "sub": args.sub}
        for name in ("groups", "roles", "scopes"):
            if getattr(args, name):
                entry[name] = list(getattr(args, name))
        for name in ("tenant", "email"):
            if getattr(args, name):
                entry[name] = getattr(args, name)
        if expires is not None:
            entry["expires"] = expires.isoformat()
        print("# add under identity.api_keys:", file=sys.stderr)
        print(yaml.safe_dump([entry], sort_keys=False).rstrip(), file=sys.stderr)
        print(key)
        return 0
    cfg = _config(args)

    async def run() -> tuple[str, ApiKey]:
        store = await ApiKeyStore.open(cfg.state.url)
        try:
            return await store.create(
                args.sub,
                groups=args.groups,
                roles=args.roles,
                tenant=args.tenant,
                email=args.email,
                scopes=args.scopes,
                expires=expires,
                description=args.description,
            )
        finally:
            await store.close()

    key, record = asyncio.run(run())
    print(f"created API key {record.prefix} for {record.sub}; shown once, store it now:", file=sys.stderr)
    print(key)
    return 0


def _row(k: ApiKey) -> list[str]:
    if k.revoked is not None:
        state = f"revoked {k.revoked:%Y-%m-%d}"
    elif k.expires is not None and k.expires <= datetime.now(UTC):
        state = "expired"
    else:
        state = "active"
    return [
        k.prefix,
        k.sub,
        ",".join(k.groups) or "-",
        " ".join(k.scopes) or "-",
        f"{k.expires:%Y-%m-%d}" if k.expires else "never",
        state,
        k.source,
    ]


def cmd_list(args: argparse.Namespace) -> int:
    cfg = _config(args)

    async def run() -> list[ApiKey]:
        store = await ApiKeyStore.open(cfg.state.url)
        try:
            return await store.list()
        finally:
            await store.close()

    keys = [from_config(k) for k in cfg.identity.api_keys] + asyncio.run(run())
    rows = [["PREFIX", "SUB", "GROUPS", "SCOPES", "EXPIRES", "STATE", "SOURCE"]]
    rows += [_row(k) for k in keys if args.all or (k.revoked is None)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if any(k.prefix == args.prefix for k in cfg.identity.api_keys):
        print(
            f"bastion: key {args.prefix} is in the config file: remove it from identity.api_keys",
            file=sys.stderr,
        )
        return 1

    async def run() -> bool:
        store = await ApiKeyStore.open(cfg.state.url)
        try:
            return await store.revoke(args.prefix)
        finally:
            await store.close()

    if not asyncio.run(run()):
        print(f"bastion: no active API key with prefix {args.prefix}", file=sys.stderr)
        return 1
    print(f"revoked API key {args.prefix} (replicas stop accepting it within 30 s)", file=sys.stderr)
    return 0


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    keys = subparsers.add_parser("keys", help="API keys for service agents (stored hashed)")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    c = sub.add_parser("create", parents=[common], help="create a key; it is printed once")
    c.add_argument("--sub", required=True, help="the principal the key stands for (Cedar User id)")
    c.add_argument("--group", dest="groups", action="append", default=[], help="repeatable")
    c.add_argument("--role", dest="roles", action="append", default=[], help="repeatable")
    c.add_argument("--scope", dest="scopes", action="append", default=[], help="repeatable")
    c.add_argument("--tenant")
    c.add_argument("--email")
    c.add_argument("--description")
    c.add_argument("--expires-in-days", type=int)
    c.add_argument(
        "--config-entry",
        action="store_true",
        help="store nothing; print an identity.api_keys entry for the config file",
    )
    c.set_defaults(func=cmd_create)

    ls = sub.add_parser("list", parents=[common], help="list keys (never the keys themselves)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    ls.set_defaults(func=cmd_list)

    r = sub.add_parser("revoke", parents=[common], help="revoke a key by its prefix")
    r.add_argument("prefix")
    r.set_defaults(func=cmd_revoke)
