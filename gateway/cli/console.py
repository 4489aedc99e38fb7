"""`bastion console login --user U [--group G ...]`: a one-time link that opens the web console.

Run it where Bastion's config and `data_dir` are: the link is signed with the console's key
there, so whoever can run this is trusted to name an admin (as with `bastion approvals`). The
user must be an admin by the config (`admin.subjects`, or one of the `--group`s in `admin.groups`).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    cmds = sub.add_parser("console", help="the web console").add_subparsers(
        dest="console_command", required=True
    )
    login = cmds.add_parser("login", parents=[common], help="print a one-time link that signs a browser in")
    login.add_argument(
        "--user", required=True, help="the admin: a subject of the first issuer, or ISSUER#SUBJECT"
    )
    login.add_argument("--group", action="append", default=[], help="a group the admin is in (repeatable)")
    login.add_argument(
        "--ttl", type=float, help="seconds the link is good for (default: console.login_ttl_s)"
    )
    login.set_defaults(func=cmd_login)


def cmd_login(args: argparse.Namespace) -> int:
    from gateway.cli import load_or_demo
    from gateway.errors import ConfigError
    from gateway.fronts.console.session import ConsoleKeys

    cfg = load_or_demo(args.config)
    ids = cfg.identity.identities()
    try:
        user = ids.resolve(args.user)
    except ValueError as exc:
        raise ConfigError(f"--user: {exc}") from None
    admins = {ids.resolve(s) for s in cfg.admin.subjects}
    if user not in admins and not set(args.group) & set(cfg.admin.groups):
        raise ConfigError(
            f"--user {args.user}: not an admin (name them in admin.subjects, or pass a --group listed "
            "in admin.groups)"
        )
    if not cfg.console.enabled:
        raise ConfigError("the console is off (console.enabled: false)")
    issuers = [i.issuer for i in cfg.identity.issuers]
    named = next((i for i in issuers if user.startswith(f"{i}#")), None)
    issuer = named or (issuers[0] if issuers else "bastion")
    ttl = args.ttl if args.ttl is not None else cfg.console.login_ttl_s
    key_file = cfg.console.key_file or cfg.data_dir / "console.key"
    token = ConsoleKeys(key_file).login_link(user, issuer, args.group, ttl)
    print(f"{cfg.listen.base_url}/console/login?token={token}")
    print(f"(good once, for {ttl:g} s)")
    return 0
