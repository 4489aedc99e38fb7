"""Retention: delete records older than `audit.retention_days` without breaking verification.

Each chain can only lose a *prefix*: the records up to the last one, in chain order, before
which every record is older than the cut-off. A signed `purge` checkpoint naming that record's
seq and hash is written in the same transaction as the delete, so `verify` knows the chain
legitimately starts after it, and a deletion nobody signed is still caught.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from audit.checkpoint import CheckpointSigner
from audit.store import AuditStore


@dataclass(frozen=True, slots=True)
class Purged:
    instance: str
    through_seq: int | None
    records: int


async def purge(store: AuditStore, before: datetime, signer: CheckpointSigner) -> list[Purged]:
    """Delete what is older than `before`; return what went, per instance (and for unchained rows)."""
    done: list[Purged] = []
    for instance in await store.instances():
        first_kept = await store.first_kept_seq(instance, before)
        head, _ = await store.chain_head(instance)
        cut = first_kept - 1 if first_kept is not None else head.seq
        at = await store.record_at(instance, cut) if cut > 0 else None
        if at is None or at[1] is None:
            continue  # nothing old enough, or already purged through `cut`
        anchor = signer.sign(instance, cut, at[1], "purge")
        done.append(Purged(instance, cut, await store.purge_prefix(instance, cut, anchor)))
    legacy = await store.purge_unchained(before)
    if legacy:
        done.append(Purged("(unchained, schema version 1)", None, legacy))
    return done
