"""The hash chain: each completed record carries the hash of the one before it, per instance.

    hash = SHA-256( RFC 8785 canonical JSON of the record's `to_json()` without `hash` )

The hashed document includes `seq` (the record's place in its instance's chain) and
`prev_hash`, so editing, removing, inserting or reordering a record breaks a link that
`verify` recomputes. A record joins the chain when it is final: a `pending` record stays outside
until its outcome is known, then the completed record is chained in completion order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from audit.record import AuditRecord, canonical_json


@dataclass(frozen=True, slots=True)
class Head:
    """The last record of an instance's chain: the next one gets `seq + 1` and `prev_hash = hash`."""

    seq: int
    hash: str | None


GENESIS = Head(0, None)


def document_hash(doc: dict[str, Any]) -> str:
    """The chain hash of a stored record document (every key except `hash`)."""
    return hashlib.sha256(canonical_json({k: v for k, v in doc.items() if k != "hash"})).hexdigest()


def link(record: AuditRecord, head: Head) -> AuditRecord:
    """`record` as the next link after `head`, with `seq`, `prev_hash` and `hash` set."""
    doc = record.to_json()
    doc.update(seq=head.seq + 1, prev_hash=head.hash)
    doc.pop("hash", None)
    return record.but(seq=head.seq + 1, prev_hash=head.hash, hash=document_hash(doc))
