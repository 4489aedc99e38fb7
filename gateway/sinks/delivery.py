"""Delivery: one task per sink reads each instance chain after its cursor and sends it in batches.

The source is the audit store, never memory: a record is sent only once it is chained (final and
durable), and the cursor in the state DB moves only after the sink confirmed the batch. So a sink
that is down, slow or refusing costs the calls nothing (their records wait in the store), a crash
anywhere loses nothing (what was sent but not confirmed is sent again), and records reach the sink
in chain order per instance. A backlog past `max_lag_records` raises an alarm; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from audit.store import AuditStore, AuditStoreError
from gateway import metrics
from gateway.config import FileSinkConfig, HttpSinkConfig, SinkConfig, SyslogSinkConfig
from gateway.errors import ConfigError, SinkError
from gateway.sinks.events import Event, render
from gateway.sinks.file import FileTarget
from gateway.sinks.http import HttpTarget
from gateway.sinks.syslog import SyslogTarget
from gateway.state.sink_cursors import SinkCursors

log = logging.getLogger(__name__)

POLL_S = 1.0
"""Longest wait for new records when nothing woke the worker (other replicas' chains, missed wake-ups)."""
LINGER_S = 0.5
"""After a wake-up, wait this long for more records to share the batch. A batch costs about the
same however many records it holds (the reads, the cursor's commit, one request), so under load
a longer wait is far cheaper for the calls: at 0.05 s, batches of ~15 records cost the calls 16-22%
of their throughput on a 2-core machine (docs/benchmarks.md)."""
LAG_REFRESH_S = 5.0
"""While a sink is down and backing off, its lag is read again this often (for /readyz, metrics)."""
REFRESH_S = 30.0
"""How often the list of instance chains in the store is read again (at least once per lease:
a replica that died is noticed when its lease runs out)."""
BACKOFF_MIN_S = 0.5


class Target(Protocol):
    def describe(self) -> str: ...
    async def send(self, events: list[Event]) -> None: ...
    async def aclose(self) -> None: ...


def target_for(cfg: SinkConfig) -> Target:
    """The sink's transport; a token, CA or key that cannot be read stops start-up naming the sink."""
    try:
        if isinstance(cfg, HttpSinkConfig):
            return HttpTarget(cfg)
        if isinstance(cfg, SyslogSinkConfig):
            return SyslogTarget(cfg)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"audit.sinks.{cfg.name}: {type(exc).__name__}: {exc}") from exc
    assert isinstance(cfg, FileSinkConfig)
    return FileTarget(cfg)


@dataclass(slots=True)
class _Chain:
    seq: int
    """The cursor: the last record the sink confirmed."""
    lease_until: float
    """Monotonic time after which the lease must be renewed before sending more."""
    lag: int = 0


@dataclass(slots=True)
class SinkStatus:
    up: bool = True
    error: str | None = None
    error_at: float | None = None
    delivered: int = 0
    lag: dict[str, int] = field(default_factory=dict)
    """Per instance chain this replica holds."""

    def to_json(self, cfg: SinkConfig) -> dict[str, Any]:
        lag = sum(self.lag.values())
        state = "down" if not self.up else "backlog" if lag > cfg.max_lag_records else "up"
        return {
            "state": state,
            "type": cfg.type,
            "format": cfg.format,
            "lag_records": lag,
            "chains": dict(sorted(self.lag.items())),
            "delivered": self.delivered,
            "last_error": self.error,
        }


class SinkWorker:
    def __init__(
        self, cfg: SinkConfig, target: Target, store: AuditStore, cursors: SinkCursors, instance: str
    ) -> None:
        self.cfg = cfg
        self.target = target
        self.store = store
        self.cursors = cursors
        self.instance = instance
        self.status = SinkStatus()
        self.wake = asyncio.Event()
        self._chains: dict[str, _Chain] = {}
        self._instances: list[str] = [instance]
        self._refreshed = 0.0
        self._next_claim: dict[str, float] = {}
        self._released: dict[str, int] = {}
        """Other replicas' chains this one caught up on and let go: the cursor it left them at."""
        self._gaps_noted: set[tuple[str, int]] = set()
        self._backlog = False
        metrics.labelled(metrics.SINK_UP, cfg.name).set(1)
        metrics.labelled(metrics.SINK_LAG, cfg.name).set(0)
        metrics.labelled(metrics.SINK_BACKLOG, cfg.name).set(0)
        metrics.labelled(metrics.SINK_DELIVERED, cfg.name)
        metrics.labelled(metrics.SINK_FAILURES, cfg.name)

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                more = await self.round()
                failures = 0
            except SinkError as exc:
                await self._failed(str(exc))
                failures += 1
            except (AuditStoreError, SQLAlchemyError, OSError) as exc:
                # The store or the state DB: nothing was lost, delivery waits for them.
                await self._failed(f"reading the trail or the cursor: {type(exc).__name__}: {exc}"[:300])
                failures += 1
            except Exception as exc:  # a bug or a record it cannot read: say so, keep the sink alive
                log.exception("audit sink %s: delivery failed", self.cfg.name)
                await self._failed(f"{type(exc).__name__}: {exc}"[:300])
                failures += 1
            if failures:
                delay = min(self.cfg.backoff_max_s, BACKOFF_MIN_S * 2 ** min(failures - 1, 20))
                await self._back_off(delay * random.uniform(0.8, 1.2))
                continue
            if more:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_S)
            if self.wake.is_set():
                self.wake.clear()
                await asyncio.sleep(LINGER_S)

    async def round(self) -> bool:
        """One batch from each chain this replica holds or can take; True if more is waiting."""
        now = time.monotonic()
        if now - self._refreshed > min(REFRESH_S, self.cfg.lease_s):
            found = await self.store.instances()
            self._instances = [self.instance, *(i for i in found if i != self.instance)]
            self._refreshed = now
        more = False
        for instance in self._instances:
            chain = await self._hold(instance)
            if chain is not None:
                more |= await self._deliver(instance, chain)
        self._publish()
        return more

    async def _hold(self, instance: str) -> _Chain | None:
        """The chain if this replica holds its lease (claimed or renewed when due), else None."""
        now = time.monotonic()
        chain = self._chains.get(instance)
        if chain is not None and chain.lease_until - now > self.cfg.lease_s / 2:
            return chain
        if chain is None and self._next_claim.get(instance, 0.0) > now:
            return None
        quiet_at = self._released.get(instance)
        if chain is None and quiet_at is not None and await self.store.last_seq(instance) <= quiet_at:
            # Another replica's chain with nothing new since this one let it go: a read, not a
            # claim (dead replicas' chains pile up over time; each would cost a write a second).
            self._next_claim[instance] = now + POLL_S
            return None
        seq = await self.cursors.claim(self.cfg.name, instance, self.cfg.lease_s)
        if seq is None:
            self._chains.pop(instance, None)
            self.status.lag.pop(instance, None)
            self._next_claim[instance] = now + self.cfg.lease_s / 3
            return None
        if chain is None:
            log.info("audit sink %s: delivering %s's chain after seq %d", self.cfg.name, instance, seq)
        chain = self._chains[instance] = _Chain(seq, now + self.cfg.lease_s)
        return chain

    async def _deliver(self, instance: str, chain: _Chain) -> bool:
        rows = await self.store.chained_after(instance, chain.seq, self.cfg.batch_max)
        if not rows:
            chain.lag = 0
            self.status.lag[instance] = 0
            if instance != self.instance:
                # Caught up on another replica's chain: let it go, so that replica takes it back
                # when it returns (its own chain is delivered first), or anyone does if new records come.
                await self.cursors.release(self.cfg.name, instance)
                self._released[instance] = chain.seq
                self._chains.pop(instance, None)
                self.status.lag.pop(instance, None)
                self._next_claim[instance] = time.monotonic() + POLL_S
            self._up()
            return False
        first = rows[0][0]
        if chain.seq and first != chain.seq + 1 and (instance, first) not in self._gaps_noted:
            self._gaps_noted.add((instance, first))
            log.error(
                "audit sink %s: records %d..%d of %s are no longer in the audit store (purged?) and "
                "were not delivered",
                self.cfg.name, chain.seq + 1, first - 1, instance,
            )  # fmt: skip
        fmt = self.cfg.format
        events = await asyncio.to_thread(lambda: [render(fmt, instance, s, text) for s, text in rows])
        await self.target.send(events)
        last = rows[-1][0]
        if not await self.cursors.advance(self.cfg.name, instance, last, len(rows), self.cfg.lease_s):
            log.warning(
                "audit sink %s: %s's chain was taken over by another replica", self.cfg.name, instance
            )
            self._chains.pop(instance, None)
            self.status.lag.pop(instance, None)
            return False
        chain.seq = last
        chain.lease_until = time.monotonic() + self.cfg.lease_s
        self.status.delivered += len(rows)
        metrics.labelled(metrics.SINK_DELIVERED, self.cfg.name).inc(len(rows))
        # Fewer rows than asked for: that read reached the head (no query for the lag).
        full = len(rows) == self.cfg.batch_max
        chain.lag = max(0, await self.store.last_seq(instance) - last) if full else 0
        self.status.lag[instance] = chain.lag
        self._up()
        return chain.lag > 0

    def _up(self) -> None:
        if not self.status.up:
            log.warning("audit sink %s: delivering again", self.cfg.name)
        self.status.up = True
        self.status.error = None
        metrics.labelled(metrics.SINK_UP, self.cfg.name).set(1)

    async def _failed(self, error: str) -> None:
        if self.status.up or error != self.status.error:
            log.error("audit sink %s (%s): %s", self.cfg.name, self.target.describe(), error)
        self.status.up = False
        self.status.error = error
        self.status.error_at = time.time()
        metrics.labelled(metrics.SINK_UP, self.cfg.name).set(0)
        metrics.labelled(metrics.SINK_FAILURES, self.cfg.name).inc()
        for instance in list(self._chains):
            with contextlib.suppress(SQLAlchemyError, OSError):
                await self.cursors.failed(self.cfg.name, instance, error)
        await self._read_lag()

    async def _read_lag(self) -> None:
        """The lag grows while the sink is down: read it so the alarm, metrics and /readyz see it."""
        with contextlib.suppress(AuditStoreError):
            for instance, chain in self._chains.items():
                chain.lag = max(0, await self.store.last_seq(instance) - chain.seq)
                self.status.lag[instance] = chain.lag
        self._publish()

    async def _back_off(self, delay: float) -> None:
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, LAG_REFRESH_S))
            if end - time.monotonic() > 0:
                await self._read_lag()

    def _publish(self) -> None:
        lag = sum(self.status.lag.values())
        metrics.labelled(metrics.SINK_LAG, self.cfg.name).set(lag)
        backlog = lag > self.cfg.max_lag_records
        if backlog != self._backlog:
            self._backlog = backlog
            metrics.labelled(metrics.SINK_BACKLOG, self.cfg.name).set(int(backlog))
            if backlog:
                log.error(
                    "audit sink %s: %d records undelivered, past max_lag_records %d (nothing is dropped; "
                    "they wait in the audit store)",
                    self.cfg.name, lag, self.cfg.max_lag_records,
                )  # fmt: skip
            else:
                log.warning("audit sink %s: backlog back under max_lag_records", self.cfg.name)

    async def release(self) -> None:
        for instance in list(self._chains):
            with contextlib.suppress(SQLAlchemyError, OSError):
                await self.cursors.release(self.cfg.name, instance)
        self._chains.clear()


class Sinks:
    """Every configured sink's worker, started with the gateway and stopped before its stores close."""

    def __init__(
        self, configs: list[SinkConfig], store: AuditStore, cursors: SinkCursors, instance: str
    ) -> None:
        self.workers = [SinkWorker(cfg, target_for(cfg), store, cursors, instance) for cfg in configs]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for w in self.workers:
            self._tasks.append(asyncio.create_task(w.run(), name=f"audit-sink-{w.cfg.name}"))

    def wake(self) -> None:
        """Called by the audit writer after each commit: new records may be chained."""
        for w in self.workers:
            w.wake.set()

    def status(self) -> dict[str, dict[str, Any]]:
        return {w.cfg.name: w.status.to_json(w.cfg) for w in self.workers}

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for w in self.workers:
            await w.release()
            await w.target.aclose()
