"""Fault handling for forwarded tool calls: a deadline, retries of idempotent tools, a breaker.

One `FaultGuard` per upstream wraps the sending of each `tools/call`:

- Deadline: `tools.<t>.timeout_s` (else the upstream's `timeout_s`) bounds the whole call, every
  attempt and the wait between them included, up to the last byte of a streamed answer. httpx's
  timeouts only bound each read, so a stream that trickles would otherwise never end.
- Retries: only for tools marked `idempotent: true`, only when `retries` is set, only for
  failures of the upstream (unreachable, reset, timeout, HTTP 5xx, malformed JSON-RPC, a stream
  that ends before its first event), never once a byte of a streamed answer reached the
  client. Waits grow exponentially with jitter; a retry budget per upstream (a share of recent
  calls, plus a minimum) keeps retries from multiplying the load on an upstream that is down.
  A call that was eligible for retries and still failed is a dead letter (`DeadLetter`).
- Breaker: after `breaker.failures` consecutive failed calls the circuit opens and calls fail
  fast (`CircuitOpen`, nothing is sent) for `reset_s`; then one probe call goes through
  (half-open) and its outcome closes or re-opens the circuit. Breaker state is per replica.

A JSON-RPC error or an `isError` result is the tool answering, not the upstream failing: it
is neither retried nor counted by the breaker.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from httpx_sse import ServerSentEvent

from gateway import metrics
from gateway.config import BreakerConfig, RetryConfig, ToolSettings, UpstreamConfig
from gateway.errors import BrokenReply, CircuitOpen, DeadLetter, UpstreamError, UpstreamTimeout
from gateway.upstreams.streamable_http import Reply

CircuitState = Literal["closed", "half-open", "open"]
_GAUGE = {"closed": 0, "half-open": 1, "open": 2}
BUDGET_WINDOW_S = 10.0
_DEFAULT_TOOL = ToolSettings()

Send = Callable[[], Awaitable[tuple[Reply, Any]]]
"""Sends the call once more; returns the upstream's reply (body unread) and the front's extra."""


class Breaker:
    """Consecutive-failure circuit breaker with a single half-open probe."""

    def __init__(self, upstream: str, cfg: BreakerConfig) -> None:
        self.upstream = upstream
        self.cfg = cfg
        self.failures = 0
        self._open_since: float | None = None
        self._probe_since: float | None = None
        metrics.CIRCUIT_STATE.labels(upstream).set(0)

    @property
    def state(self) -> CircuitState:
        if self._open_since is None:
            return "closed"
        if self._probe_since is not None or time.monotonic() - self._open_since >= self.cfg.reset_s:
            return "half-open"
        return "open"

    def admit(self) -> None:
        """Let a call through, or raise `CircuitOpen`. In half-open, only one probe at a time."""
        if self._open_since is None:
            return
        now = time.monotonic()
        if self._probe_since is not None and now - self._probe_since < self.cfg.reset_s:
            raise CircuitOpen(
                f"upstream {self.upstream} is failing: circuit half-open, a probe call is in flight",
                self.cfg.reset_s,
            )
        wait = self.cfg.reset_s - (now - self._open_since)
        if self._probe_since is None and wait > 0:
            raise CircuitOpen(
                f"upstream {self.upstream} is failing: circuit open after {self.failures} consecutive "
                f"failures; calls fail fast for {wait:.1f} s more",
                wait,
            )
        self._probe_since = now
        self._set_gauge()

    def report(self, ok: bool | None) -> None:
        """The outcome of an admitted call: True succeeded, False failed, None unknown (abandoned)."""
        if ok is None:
            self._probe_since = None
        elif ok:
            self.failures = 0
            self._open_since = self._probe_since = None
        else:
            self.failures += 1
            if self._open_since is not None or self.failures >= self.cfg.failures:
                self._open_since = time.monotonic()
                self._probe_since = None
        self._set_gauge()

    def _set_gauge(self) -> None:
        metrics.CIRCUIT_STATE.labels(self.upstream).set(_GAUGE[self.state])


class RetryBudget:
    """Retries allowed over the last `BUDGET_WINDOW_S`: `ratio` of the calls plus `minimum`."""

    def __init__(self, cfg: RetryConfig) -> None:
        self.ratio = cfg.budget_ratio
        self.minimum = cfg.budget_min
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _prune(self, now: float) -> None:
        for q in (self._calls, self._retries):
            while q and now - q[0] > BUDGET_WINDOW_S:
                q.popleft()

    def called(self) -> None:
        now = time.monotonic()
        self._prune(now)
        self._calls.append(now)

    def try_spend(self) -> bool:
        now = time.monotonic()
        self._prune(now)
        if len(self._retries) >= self.minimum + self.ratio * len(self._calls):
            return False
        self._retries.append(now)
        return True


@dataclass(frozen=True, slots=True)
class Plan:
    timeout_s: float
    attempts: int
    """1 unless the tool is idempotent and the upstream has `retries`."""
    backoff_s: float


@dataclass(slots=True)
class Delivered:
    """A reply that got through: its body read (`raw`) or, for a stream, its first event read."""

    reply: Reply
    extra: Any
    raw: bytes | None
    first: ServerSentEvent | None = None
    rest: AsyncIterator[ServerSentEvent] | None = None
    deadline: float = 0.0
    timeout_s: float = 0.0
    breaker: Breaker | None = None
    upstream: str = ""
    _events_taken: bool = field(default=False, repr=False)

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """The stream's events, the first included, each bounded by the call's deadline.

        The breaker hears how the stream ended: cleanly, broken or stalled past the deadline."""
        assert self.first is not None and self.rest is not None and not self._events_taken
        self._events_taken = True
        verdict: bool | None = None
        try:
            yield self.first
            while True:
                try:
                    async with asyncio.timeout(self.deadline - asyncio.get_running_loop().time()):
                        event = await anext(self.rest)
                except StopAsyncIteration:
                    verdict = True
                    return
                except TimeoutError:
                    verdict = False
                    raise UpstreamTimeout(
                        f"upstream {self.upstream} did not finish within {self.timeout_s:g} s"
                    ) from None
                except UpstreamError:
                    verdict = False
                    raise
                yield event
        finally:
            if self.breaker is not None:
                self.breaker.report(verdict)

    async def aclose(self) -> None:
        """Release a stream whose events will not be read."""
        if self.rest is not None and not self._events_taken:
            close = getattr(self.rest, "aclose", None)
            if close is not None:
                await close()
        await self.reply.aclose()


class _Failed(Exception):
    """One attempt failed in a way worth retrying (for idempotent tools)."""

    def __init__(self, err: UpstreamError, status: int | None = None, delivered: Delivered | None = None):
        super().__init__(err.message)
        self.err = err
        self.status = status
        self.delivered = delivered


def may_have_run(err: UpstreamError) -> bool:
    """Whether the tool may have run despite the failure (then budgets are not refunded)."""
    if isinstance(err, CircuitOpen):
        return False
    if isinstance(err, DeadLetter):
        return err.upstream_status is not None or may_have_run(err.last) or err.attempts > 1
    return isinstance(err, UpstreamTimeout | BrokenReply)


def surely_not_sent(err: UpstreamError) -> bool:
    """Whether the call certainly never reached the upstream (its call_id may then be reused)."""
    return isinstance(err, CircuitOpen) or isinstance(err.__cause__, httpx.ConnectError)


class FaultGuard:
    """Deadline, retries and breaker for the tool calls of one upstream."""

    def __init__(self, upstream: str, cfg: UpstreamConfig) -> None:
        self.upstream = upstream
        self.cfg = cfg
        self.breaker = Breaker(upstream, cfg.breaker) if cfg.breaker else None
        self.budget = RetryBudget(cfg.retries) if cfg.retries else None

    def plan(self, tool: str) -> Plan:
        settings = self.cfg.tools.get(tool, _DEFAULT_TOOL)
        retries = self.cfg.retries
        timeout_s = settings.timeout_s or self.cfg.timeout_s
        if settings.idempotent and retries is not None:
            return Plan(timeout_s, retries.attempts, retries.backoff_s)
        return Plan(timeout_s, 1, 0.0)

    @property
    def state(self) -> CircuitState | None:
        return self.breaker.state if self.breaker else None

    async def deliver(self, tool: str, send: Send) -> Delivered:
        """Send a tools/call until it gets through, retries and the deadline permitting.

        Raises `CircuitOpen` (nothing sent), `DeadLetter` (an idempotent call that failed every
        attempt it was allowed), or the attempt's `UpstreamError`. An HTTP error status that is
        not retried comes back as a `Delivered` with its body, for the front to relay.
        """
        plan = self.plan(tool)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + plan.timeout_s
        if self.budget is not None:
            self.budget.called()
        attempt = 0
        while True:
            attempt += 1
            try:
                if self.breaker is not None:
                    self.breaker.admit()
            except CircuitOpen as err:
                if attempt == 1:
                    raise
                failure = _Failed(err)
            else:
                try:
                    delivered = await self._attempt(send, deadline, plan)
                except _Failed as exc:
                    failure = exc
                    if self.breaker is not None:
                        self.breaker.report(False)
                else:
                    if self.breaker is not None and delivered.first is None:
                        self.breaker.report(delivered.reply.status < 500)
                    return delivered
            if plan.attempts == 1:
                if failure.delivered is not None:
                    return failure.delivered
                raise failure.err
            delay = plan.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            why = ""
            if attempt >= plan.attempts or isinstance(failure.err, CircuitOpen):
                pass
            elif deadline - loop.time() <= delay:
                why = f" (no time left within {plan.timeout_s:g} s)"
            elif self.budget is None or not self.budget.try_spend():
                why = " (retry budget spent)"
            else:
                metrics.UPSTREAM_RETRIES.labels(self.upstream).inc()
                await asyncio.sleep(delay)
                continue
            tries = attempt - 1 if isinstance(failure.err, CircuitOpen) else attempt
            raise DeadLetter(
                f"gave up on {self.upstream}/{tool} after {tries} attempt(s){why}: {failure.err.message}",
                failure.err,
                tries,
                failure.status,
            )

    async def _attempt(self, send: Send, deadline: float, plan: Plan) -> Delivered:
        loop = asyncio.get_running_loop()
        status: int | None = None
        try:
            async with asyncio.timeout(deadline - loop.time()):
                reply, extra = await send()
                status = reply.status
                if reply.is_sse and reply.status == 200:
                    rest = reply.events()
                    try:
                        first = await anext(rest)
                    except StopAsyncIteration:
                        empty = BrokenReply(f"upstream {self.upstream} sent an empty stream")
                        raise _Failed(empty, 200) from None
                    return Delivered(
                        reply, extra, None, first, rest, deadline, plan.timeout_s, self.breaker, self.upstream
                    )
                raw = await reply.body()
        except TimeoutError:
            err = UpstreamTimeout(f"upstream {self.upstream} did not answer within {plan.timeout_s:g} s")
            raise _Failed(err, status) from None
        except UpstreamError as err:
            if status is not None and not isinstance(err, UpstreamTimeout):
                err = BrokenReply(err.message)
            raise _Failed(err, status) from None
        delivered = Delivered(reply, extra, raw)
        if 300 <= reply.status < 400:
            where = reply.response.headers.get("location", "")[:200]
            raise UpstreamError(
                f"upstream {self.upstream} answered a redirect (HTTP {reply.status} to {where!r}); "
                "Bastion follows none: fix the upstream's url in the config"
            )
        if reply.status >= 500:
            failed = UpstreamError(f"upstream {self.upstream} answered HTTP {reply.status}")
            raise _Failed(failed, status, delivered)
        if reply.status == 200 and not _is_jsonrpc_response(raw):
            raise _Failed(BrokenReply(f"upstream {self.upstream} answered malformed JSON-RPC"), status)
        return delivered


def _is_jsonrpc_response(raw: bytes) -> bool:
    try:
        msg = json.loads(raw)
    except ValueError:
        return False
    return isinstance(msg, dict) and ("result" in msg or "error" in msg)
