"""`bastion audit verify`: recompute every instance's chain and check its signed checkpoints.

Reads the store in pages (constant memory) and stops each instance at its first bad record,
which it names: an edited record no longer matches its hash, a removed or reordered one breaks
the `prev_hash` link or leaves a gap in `seq`, a rewritten stretch disagrees with a signed
checkpoint, and a cut-off tail ends before the newest checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.chain import document_hash
from audit.checkpoint import Checkpoint, key_id, signature_ok
from audit.record import format_ts
from audit.store import AuditStore, ChainRow


@dataclass(frozen=True, slots=True)
class Problem:
    instance: str
    record_id: str | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"record {self.record_id} (seq {self.seq})" if self.record_id else f"seq {self.seq}"
        if self.seq is None and self.record_id is None:
            where = "checkpoints"
        return f"instance {self.instance}: {where}: {self.message}"


@dataclass(slots=True)
class InstanceResult:
    instance: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    newest_checkpoint: Checkpoint | None = None
    purged_through: int | None = None
    problem: Problem | None = None


@dataclass(slots=True)
class VerifyResult:
    instances: list[InstanceResult] = field(default_factory=list)
    unchained: list[Problem] = field(default_factory=list)
    legacy: int = 0
    pending: int = 0
    key_id: str | None = None

    @property
    def problems(self) -> list[Problem]:
        return [i.problem for i in self.instances if i.problem] + self.unchained

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """A human summary, one line per instance, then the verdict."""
        out = []
        for i in self.instances:
            state = "FAILED" if i.problem else "ok"
            span = f"seq {i.first_seq}..{i.last_seq}" if i.records else "no records"
            cp = i.newest_checkpoint
            newest = f", newest at seq {cp.seq} ({format_ts(cp.ts)})" if cp else ""
            purged = f", purged through seq {i.purged_through}" if i.purged_through else ""
            out.append(
                f"instance {i.instance}: {state}, {i.records} records ({span}), "
                f"{i.checkpoints} checkpoints{newest}{purged}"
            )
        if self.key_id is None:
            out.append("warning: checkpoint signatures were not checked (no key given)")
        else:
            out.append(f"checkpoint key {self.key_id}")
        if self.pending:
            out.append(f"{self.pending} record(s) pending: calls in flight, or left by a stopped instance")
        if self.legacy:
            out.append(
                f"{self.legacy} record(s) from before tamper evidence (schema version 1) not verifiable"
            )
        out.extend(f"FAILED: {p}" for p in self.problems)
        out.append("verify: ok" if self.ok else f"verify: FAILED ({len(self.problems)} problem(s))")
        return out


async def verify(store: AuditStore, public_key: Ed25519PublicKey | None) -> VerifyResult:
    result = VerifyResult(key_id=key_id(public_key) if public_key else None)
    for instance in await store.instances():
        result.instances.append(await _verify_instance(store, instance, public_key))
    rows, result.pending = await store.unchained()
    for record_id, instance, _status, version in rows:
        if version < 2:
            result.legacy += 1
        else:
            result.unchained.append(
                Problem(instance, record_id, None, "a final record outside the chain: inserted")
            )
    return result


async def _verify_instance(
    store: AuditStore, instance: str, public_key: Ed25519PublicKey | None
) -> InstanceResult:
    res = InstanceResult(instance)
    cps = await store.checkpoints(instance)
    res.checkpoints = len(cps)
    for cp in cps:
        if public_key is not None and not signature_ok(cp, public_key):
            res.problem = Problem(
                instance,
                None,
                cp.seq,
                f"the {cp.kind} checkpoint written {format_ts(cp.ts)} has a bad signature "
                f"(key {cp.key_id}): forged or altered",
            )
            return res
    if cps:
        res.newest_checkpoint = max(cps, key=lambda c: c.seq)
    anchors = [c for c in cps if c.kind == "purge"]
    anchor = max(anchors, key=lambda c: c.seq) if anchors else None
    expected, prev = (anchor.seq + 1, anchor.hash) if anchor else (1, None)
    res.purged_through = anchor.seq if anchor else None
    signed: dict[int, set[str]] = {}
    for cp in cps:
        if cp.seq >= expected:
            signed.setdefault(cp.seq, set()).add(cp.hash)
    async for row in store.iter_chain(instance):
        why = _check_row(row, expected, prev, signed)
        if why is not None:
            res.problem = Problem(instance, row.id, row.seq, why)
            return res
        if res.first_seq is None:
            res.first_seq = row.seq
        res.last_seq = row.seq
        res.records += 1
        prev = row.hash
        expected += 1
    last = expected - 1
    if res.newest_checkpoint is not None and res.newest_checkpoint.seq > last:
        cp = res.newest_checkpoint
        res.problem = Problem(
            instance,
            None,
            last + 1,
            f"missing: the chain ends at seq {last} but a checkpoint signed {format_ts(cp.ts)} shows it "
            f"reached seq {cp.seq}; records {last + 1}..{cp.seq} were removed (truncated tail)",
        )
    return res


def _check_row(row: ChainRow, expected: int, prev: str | None, signed: dict[int, set[str]]) -> str | None:
    if row.seq > expected:
        if expected == 1:
            first = f"the chain starts at seq {row.seq}"
            return f"{first}: records 1..{row.seq - 1} were deleted (no purge checkpoint covers them)"
        return f"seq {expected}..{row.seq - 1} are missing before this record: deleted"
    if row.seq < expected:
        return f"seq {row.seq} appears twice: a record was inserted"
    try:
        doc = json.loads(row.record)
    except ValueError:
        return "the stored record is not valid JSON: edited"
    if not isinstance(doc, dict):
        return "the stored record is not a JSON object: edited"
    if document_hash(doc) != doc.get("hash"):
        return "the record does not match its hash: edited"
    copies = {
        "id": row.id,
        "seq": row.seq,
        "hash": row.hash,
        "prev_hash": row.prev_hash,
        "user": row.user,
        "tool": row.tool,
        "ts": format_ts(row.ts) if isinstance(row.ts, datetime) else row.ts,
        "call_id": row.call_id,
        "protocol": row.protocol,
    }
    for key, value in copies.items():
        if doc.get(key) != value:
            return f"the indexed column {key} disagrees with the hashed record: edited"
    decision, outcome = doc.get("decision") or {}, doc.get("outcome") or {}
    if decision.get("effect") != row.effect or outcome.get("status") != row.status:
        return "the indexed effect/status columns disagree with the hashed record: edited"
    if row.prev_hash != prev:
        return (
            "prev_hash does not match the record before it: a record was deleted, inserted or reordered here"
        )
    if row.seq in signed and row.hash not in signed[row.seq]:
        return "the record differs from the signed checkpoint at this seq: the chain up to here was rewritten"
    return None
