"""Group commit with write-ahead: concurrent calls share one durable transaction.

One row per commit manages ~1,500 rows/s; 500 rows per commit ~100,000. Every method returns
only after the caller's own change is committed, so no call proceeds un-audited:

- `begin(record)`: the decision, as a `pending` row, before the call is forwarded;
- `complete(id, outcome, result_sha256)`: the pending row becomes the final record;
- `write(record)`: a record that is final at once (a denial).

`complete_later` is `complete` without the wait (`audit.durability: intent`): the change rides
with the next batch someone waits for, or is committed on its own within `LAZY_S`, so a call's
final record usually costs no commit of its own.

Final records join their instance's hash chain (`audit.chain`) in the order they are committed;
the writer is the only one that extends the chains of the instances it writes for, so one
instance name must not be used by two running processes at once. Signed checkpoints are added
to the same transactions every `checkpoint_every` records or `checkpoint_interval_s` seconds,
and when the writer closes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from audit.chain import Head, link
from audit.checkpoint import Checkpoint, CheckpointSigner
from audit.record import INTERRUPTED, AuditRecord
from audit.store import AuditStore, AuditStoreError

log = logging.getLogger(__name__)

MAX_RETRIES = 3
LAZY_S = 0.05
"""Longest a `complete_later` change waits for a batch to ride with before it is committed alone."""
RELINK_ATTEMPTS = 8
"""Re-links after losing a race for the next `seq` (two processes misconfigured with one name)."""
"""A completion whose batch failed is tried again with later batches this many times; if it
never lands, the row stays `pending` and is recorded as `interrupted` at the next start."""

INTERRUPTED_OUTCOME: dict[str, Any] = {
    "status": INTERRUPTED,
    "latency_ms": None,
    "upstream_status": None,
    "error": "Bastion stopped before the outcome was recorded; the call may have reached the tool",
}


@dataclass(slots=True)
class _Item:
    kind: Literal["write", "begin", "complete"]
    record: AuditRecord | None
    audit_id: str
    outcome: dict[str, Any] | None = None
    result_sha256: str | None = None
    changes: dict[str, Any] | None = None
    fut: asyncio.Future[None] | None = None
    tries: int = 0


class AuditWriter:
    """Queues changes; one background task commits them in batches of up to `batch_max`.

    After picking up work when idle, the task waits at most `window_ms` for more to arrive.
    Changes that arrive while a commit is in flight go in the next batch without waiting.
    Without a `signer`, no checkpoints are written (the chain alone still shows edits).
    """

    def __init__(
        self,
        store: AuditStore,
        batch_max: int = 500,
        window_ms: float = 2.0,
        *,
        signer: CheckpointSigner | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 10.0,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if window_ms < 0:
            raise ValueError("window_ms must not be negative")
        if checkpoint_every < 1 or checkpoint_interval_s <= 0:
            raise ValueError("checkpoint_every and checkpoint_interval_s must be positive")
        self._store = store
        self._batch_max = batch_max
        self._window = window_ms / 1000
        self._signer = signer
        self._cp_every = checkpoint_every
        self._cp_interval = checkpoint_interval_s
        self._queue: deque[_Item] = deque()
        self._lazy: deque[_Item] = deque()
        self._retry: list[_Item] = []
        self._pending: dict[str, AuditRecord] = {}
        self._heads: dict[str, Head] = {}
        self._cp_seq: dict[str, int] = {}
        self._cp_time: dict[str, float] = {}
        self._work = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []
        """Called after every commit (the audit sinks wake up: new records may be chained)."""
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0
        self.failed = 0
        self.batches = 0
        self.checkpoints = 0

    @property
    def pending(self) -> int:
        """Changes accepted but not yet committed or failed."""
        return len(self._queue) + len(self._lazy)

    @property
    def in_flight(self) -> int:
        """Calls recorded as pending whose outcome has not been recorded yet."""
        return len(self._pending)

    def is_pending(self, audit_id: str) -> bool:
        """Whether `audit_id` was begun here and awaits `complete`."""
        return audit_id in self._pending

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("audit writer already started")
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def write(self, record: AuditRecord) -> None:
        """Return once `record` is committed as a final, chained record."""
        await self._submit(_Item("write", record, record.id))

    async def begin(self, record: AuditRecord) -> None:
        """Return once `record` is committed as pending (outside the chain until it completes)."""
        await self._submit(_Item("begin", record, record.id))

    async def complete(
        self,
        audit_id: str,
        outcome: dict[str, Any],
        result_sha256: str | None,
        changes: dict[str, Any] | None = None,
    ) -> None:
        """Return once the pending record `audit_id` is committed with its outcome, chained.

        `changes`: other fields learned after the call was begun (`pii`, `decision`)."""
        await self._submit(_Item("complete", None, audit_id, outcome, result_sha256, changes))

    def complete_later(
        self,
        audit_id: str,
        outcome: dict[str, Any],
        result_sha256: str | None,
        changes: dict[str, Any] | None = None,
    ) -> None:
        """`complete` without waiting for the commit (see the module docstring). A failure is
        logged; the row stays `pending` and the next start records it as `interrupted`."""
        self._check_open()
        self._lazy.append(_Item("complete", None, audit_id, outcome, result_sha256, changes))
        if len(self._lazy) == 1 or len(self._lazy) >= self._batch_max:
            self._work.set()  # the writer's wait is re-armed with the LAZY_S deadline

    async def recover(self, instance: str) -> int:
        """Record `instance`'s pending rows, left by a process that stopped without finishing
        them, as `interrupted`; return how many. Run before the instance takes new calls."""
        stale = await self._store.pending(instance)
        for record in stale:
            self._pending[record.id] = record
        await asyncio.gather(*(self.complete(r.id, dict(INTERRUPTED_OUTCOME), None) for r in stale))
        return len(stale)

    async def close(self) -> None:
        """Refuse new changes, commit every accepted one, write final checkpoints, then stop."""
        self._closing = True
        self._work.set()
        self._full.set()
        if self._task is not None:
            await asyncio.shield(self._task)

    async def __aenter__(self) -> AuditWriter:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closing:
            raise AuditStoreError("audit writer is closed")
        if self._task is None:
            raise RuntimeError("audit writer not started")
        if self._task.done():
            raise AuditStoreError("audit writer stopped")

    async def _submit(self, item: _Item) -> None:
        self._check_open()
        item.fut = asyncio.get_running_loop().create_future()
        self._queue.append(item)
        self._work.set()
        if len(self._queue) >= self._batch_max:
            self._full.set()
        await item.fut

    async def _run(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._lazy and (self._closing or len(self._lazy) >= self._batch_max):
                        await self._commit(self._take(self._lazy, self._batch_max))
                        continue
                    if self._closing:
                        await self._final_checkpoints()
                        return
                    self._work.clear()
                    try:
                        async with asyncio.timeout(LAZY_S if self._lazy else self._cp_interval):
                            await self._work.wait()
                    except TimeoutError:
                        if self._lazy:
                            await self._commit(self._take(self._lazy, self._batch_max))
                        else:
                            await self._idle_checkpoints()
                        continue
                    await self._gather()
                    continue
                batch = self._take(self._queue, self._batch_max)
                await self._commit(batch + self._take(self._lazy, self._batch_max - len(batch)))
        finally:
            stopped = AuditStoreError("audit writer stopped")
            self._fail(list(self._queue), stopped)
            self._queue.clear()
            if self._lazy:
                log.error(
                    "audit writer stopped with %d completion(s) uncommitted: they stay pending",
                    len(self._lazy),
                )
                self._lazy.clear()

    @staticmethod
    def _take(queue: deque[_Item], n: int) -> list[_Item]:
        return [queue.popleft() for _ in range(min(n, len(queue)))]

    async def _gather(self) -> None:
        """Give concurrent callers up to `window_ms` to join the batch about to be committed."""
        if self._window <= 0 or self._closing or len(self._queue) >= self._batch_max:
            return
        self._full.clear()
        try:
            async with asyncio.timeout(self._window):
                await self._full.wait()
        except TimeoutError:
            pass

    async def _commit(self, batch: list[_Item]) -> None:
        retry, self._retry = self._retry, []
        items = retry + batch
        try:
            for attempt in range(1, RELINK_ATTEMPTS + 1):
                instances = {self._instance_of(i) for i in items} - {None}
                for instance in instances - self._heads.keys():
                    assert instance is not None
                    head, cp_seq = await self._store.chain_head(instance)
                    self._heads[instance], self._cp_seq[instance] = head, cp_seq
                    self._cp_time[instance] = time.monotonic()
                inserts, completions, heads, unknown = self._link(items)
                checkpoints = self._due_checkpoints(heads, "periodic")
                try:
                    await self._store.apply(inserts, completions, checkpoints)
                    break
                except AuditStoreError:
                    if attempt == RELINK_ATTEMPTS:
                        raise
                    # Another process may have extended a chain under the same instance name
                    # (its seq is then taken): re-read the heads and link the batch again.
                    for instance in instances:
                        self._heads.pop(str(instance), None)
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))  # let the other writer finish
        except asyncio.CancelledError:
            self._fail(batch, AuditStoreError("audit writer cancelled before commit"))
            raise
        except Exception as exc:
            log.error("audit batch of %d change(s) failed: %s", len(items), exc)
            self._fail(items, exc)
            self._retry = [
                i
                for i in items
                if i.kind == "complete" and i.audit_id in self._pending and i.tries < MAX_RETRIES
            ]
            for i in self._retry:
                i.tries += 1
                i.fut = None
            return
        self._heads.update(heads)
        self._noted(checkpoints)
        for item in items:
            if item.kind == "begin":
                assert item.record is not None
                self._pending[item.record.id] = item.record
            elif item.kind == "complete":
                self._pending.pop(item.audit_id, None)
        self.written += len(items) - len(unknown)
        self.batches += 1
        for listener in self.listeners:
            listener()
        missing = {id(i) for i in unknown}
        for item in items:
            if item.fut is not None and not item.fut.done():
                if id(item) in missing:
                    item.fut.set_exception(AuditStoreError(f"no pending audit record {item.audit_id}"))
                else:
                    item.fut.set_result(None)

    def _instance_of(self, item: _Item) -> str | None:
        if item.kind == "complete":
            pending = self._pending.get(item.audit_id)
            return pending.instance if pending else None
        return item.record.instance if item.kind == "write" and item.record else None

    def _link(
        self, items: list[_Item]
    ) -> tuple[list[AuditRecord], list[AuditRecord], dict[str, Head], list[_Item]]:
        """Rows to insert, pending rows to complete, the new chain heads, completions of unknown ids."""
        heads = dict(self._heads)
        inserts: list[AuditRecord] = []
        completions: list[AuditRecord] = []
        unknown: list[_Item] = []
        for item in items:
            if item.kind == "begin":
                assert item.record is not None
                inserts.append(item.record)
                continue
            if item.kind == "write":
                assert item.record is not None
                final = item.record
            else:
                base = self._pending.get(item.audit_id)
                if base is None:
                    unknown.append(item)
                    continue
                final = base.but(
                    outcome=item.outcome or {}, result_sha256=item.result_sha256, **(item.changes or {})
                )
            chained = link(final, heads[final.instance])
            heads[final.instance] = Head(chained.seq or 0, chained.hash)
            (inserts if item.kind == "write" else completions).append(chained)
        return inserts, completions, heads, unknown

    def _due_checkpoints(self, heads: dict[str, Head], kind: str, *, force: bool = False) -> list[Checkpoint]:
        if self._signer is None:
            return []
        now = time.monotonic()
        due = []
        for instance, head in heads.items():
            behind = head.seq - self._cp_seq.get(instance, 0)
            if head.hash is None or behind <= 0:
                continue
            late = now - self._cp_time.get(instance, now) >= self._cp_interval
            if force or behind >= self._cp_every or late:
                due.append(self._signer.sign(instance, head.seq, head.hash, kind))
        return due

    def _noted(self, checkpoints: list[Checkpoint]) -> None:
        now = time.monotonic()
        for cp in checkpoints:
            self._cp_seq[cp.instance] = cp.seq
            self._cp_time[cp.instance] = now
        self.checkpoints += len(checkpoints)

    async def _idle_checkpoints(self) -> None:
        await self._write_checkpoints(self._due_checkpoints(self._heads, "periodic"))

    async def _final_checkpoints(self) -> None:
        await self._write_checkpoints(self._due_checkpoints(self._heads, "shutdown", force=True))

    async def _write_checkpoints(self, checkpoints: list[Checkpoint]) -> None:
        if not checkpoints:
            return
        try:
            await self._store.apply(checkpoints=checkpoints)
        except AuditStoreError as exc:
            log.error("audit checkpoint failed: %s", exc)
            return
        self._noted(checkpoints)

    def _fail(self, batch: list[_Item], exc: BaseException) -> None:
        self.failed += len(batch)
        message = str(exc) if isinstance(exc, AuditStoreError) else f"audit write failed: {exc!r}"
        for item in batch:
            if item.fut is not None and not item.fut.done():
                err = AuditStoreError(message)
                err.__cause__ = exc
                item.fut.set_exception(err)
