"""`bastion audit export|verify|report|purge|migrate`.

The audit package does not read Bastion's config: the caller turns `--config` into
`AuditSettings` (the store URL, the checkpoint key file, the retention), so these commands work
wherever the audit package is installed. `--url` overrides the configured store.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from audit.checkpoint import CheckpointSigner, SigningKeyError, load_private_key, load_public_key

# The store (SQLAlchemy, Alembic) is imported by the commands that use it, so `bastion --help`
# and unrelated commands stay quick to start.


@dataclass(frozen=True, slots=True)
class AuditSettings:
    url: str
    signing_key_file: Path
    """The Ed25519 key that signs checkpoints (verify needs only its public half)."""
    retention_days: int | None = None


Resolve = Callable[[str | None], AuditSettings]
"""From the `--config` argument (None: the default config) to the audit settings."""


def timestamp(text: str) -> datetime:
    """ISO 8601; a time without a zone is UTC."""
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    resolve: Resolve,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add `bastion audit ...`; returns its subcommands, for the gateway's own (`audit sinks`)."""
    store_opts = argparse.ArgumentParser(add_help=False)
    store_opts.add_argument("--url", help="audit store URL (default: audit.url from the config)")
    parents = [common, store_opts]
    a = subparsers.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True
    )

    e = a.add_parser("export", parents=parents, help="export audit records (streamed)")
    e.add_argument("--format", default="jsonl", choices=["jsonl", "csv", "ocsf", "cef"])
    e.add_argument("-o", "--output", help="file to write (default: stdout)")
    _period(e)
    e.add_argument("--user")
    e.add_argument("--tool", help="tool name")
    e.add_argument("--effect", choices=["allow", "deny", "transform", "approval_required"])
    e.add_argument("--status", help="outcome status: completed, failed, denied, pending, ...")
    e.add_argument(
        "--call-id",
        help="every record of one call (e.g. the model's tool_use decision and the tool's execution)",
    )
    e.add_argument("--protocol", choices=["mcp", "http", "llm", "a2a"], help="how the call reached Bastion")
    progress = e.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None, help="always show a progress bar")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show one")
    e.set_defaults(func=lambda args: _export(args, resolve(args.config)))

    v = a.add_parser("verify", parents=parents, help="recompute the tamper-evidence chains; exit 1 if broken")
    v.add_argument(
        "--public-key", type=Path, help="PEM key that signs checkpoints (default: the configured one)"
    )
    v.set_defaults(func=lambda args: _verify(args, resolve(args.config)))

    r = a.add_parser("report", parents=parents, help="self-contained HTML review report")
    _period(r)
    r.add_argument("-o", "--output", default="report.html")
    r.add_argument(
        "--public-key", type=Path, help="PEM key that signs checkpoints (default: the configured one)"
    )
    r.set_defaults(func=lambda args: _report(args, resolve(args.config)))

    p = a.add_parser(
        "purge", parents=parents, help="delete records past retention, keeping chains verifiable"
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument("--before", type=timestamp, help="delete records older than this time")
    when.add_argument("--older-than-days", type=int, help="default: audit.retention_days")
    p.set_defaults(func=lambda args: _purge(args, resolve(args.config)))

    m = a.add_parser("migrate", parents=parents, help="upgrade the audit store's schema")
    m.set_defaults(func=lambda args: _migrate(args, resolve(args.config)))
    return a


def _period(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=timestamp, help="from this time (inclusive); no zone means UTC")
    p.add_argument("--until", type=timestamp, help="to this time (exclusive)")


def _fail(message: str) -> int:
    print(f"bastion: {message}", file=sys.stderr)
    return 2


def _export(args: argparse.Namespace, s: AuditSettings) -> int:
    from audit.export import run_export
    from audit.store import AuditStoreError

    try:
        count = run_export(
            args.url or s.url,
            args.format,
            args.output,
            since=args.since,
            until=args.until,
            user=args.user,
            tool=args.tool,
            effect=args.effect,
            status=args.status,
            call_id=args.call_id,
            protocol=args.protocol,
            progress=args.progress,
        )
    except AuditStoreError as exc:
        return _fail(str(exc))
    if args.output:
        print(f"exported {count} records to {args.output}", file=sys.stderr)
    return 0


def _key_path(args: argparse.Namespace, s: AuditSettings) -> Path | None:
    return args.public_key or (s.signing_key_file if s.signing_key_file.exists() else None)


def _verify(args: argparse.Namespace, s: AuditSettings) -> int:
    from audit.store import AuditStore, AuditStoreError
    from audit.verify import VerifyResult, verify

    async def run() -> VerifyResult:
        key = _key_path(args, s)
        public = None if key is None else load_public_key(key)
        store = await AuditStore.open(args.url or s.url, create=False)
        try:
            return await verify(store, public)
        finally:
            await store.close()

    try:
        result = asyncio.run(run())
    except (AuditStoreError, SigningKeyError) as exc:
        return _fail(str(exc))
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


def _report(args: argparse.Namespace, s: AuditSettings) -> int:
    from audit.report import run_report
    from audit.store import AuditStoreError

    try:
        key = _key_path(args, s)
        summary = run_report(
            args.url or s.url,
            args.output,
            since=args.since,
            until=args.until,
            public_key=None if key is None else load_public_key(key),
        )
    except (AuditStoreError, SigningKeyError) as exc:
        return _fail(str(exc))
    print(f"report on {summary.total} records written to {args.output}", file=sys.stderr)
    return 0


def _purge(args: argparse.Namespace, s: AuditSettings) -> int:
    from audit.retention import purge
    from audit.store import AuditStore, AuditStoreError

    days = args.older_than_days if args.older_than_days is not None else s.retention_days
    if args.before is None and days is None:
        return _fail("nothing to purge by: set audit.retention_days, or pass --before or --older-than-days")
    if days is not None and days < 1:
        return _fail("--older-than-days must be at least 1")
    before = args.before or datetime.now(UTC) - timedelta(days=days or 0)

    async def run() -> list[str]:
        if not s.signing_key_file.exists():
            raise SigningKeyError(
                f"checkpoint key {s.signing_key_file} not found: purge signs with the key Bastion uses"
            )
        signer = CheckpointSigner(load_private_key(s.signing_key_file))
        store = await AuditStore.open(args.url or s.url, create=False)
        try:
            done = await purge(store, before, signer)
        finally:
            await store.close()
        return [
            f"{p.instance}: deleted {p.records} records"
            + (f" through seq {p.through_seq} (signed purge checkpoint)" if p.through_seq else "")
            for p in done
        ]

    try:
        lines = asyncio.run(run())
    except (AuditStoreError, SigningKeyError) as exc:
        return _fail(str(exc))
    print("\n".join(lines) if lines else f"nothing older than {before.isoformat()}")
    return 0


def _migrate(args: argparse.Namespace, s: AuditSettings) -> int:
    from audit.store import AuditStore, AuditStoreError

    async def run() -> None:
        store = await AuditStore.open(args.url or s.url)
        await store.close()

    try:
        asyncio.run(run())
    except AuditStoreError as exc:
        return _fail(str(exc))
    print("audit store schema is up to date")
    return 0
