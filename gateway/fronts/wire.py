"""What every HTTP front reads the same way: a bounded body and the W3C trace context."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import OrderedDict
from typing import Any

from starlette.requests import Request

from gateway import metrics
from gateway.call import Decision
from gateway.errors import BodyTimeout, PayloadTooLarge, ProtocolError, TooManyRefusals

MAX_BODY = 1024 * 1024
"""Default of listen.max_body_bytes."""
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


async def read_body(
    request: Request, limit: int = MAX_BODY, timeout_s: float = 10.0, setting: str = "listen.max_body_bytes"
) -> bytes:
    """The request body, refused (413) as soon as it is known to be over `limit` bytes, and (408)
    when it takes longer than `timeout_s` to arrive: a client that trickles a body holds a
    connection and a task for as long as it likes otherwise."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(request, limit, setting)
    except TimeoutError:
        raise BodyTimeout(
            f"request body not received within {timeout_s:g} s (listen.body_timeout_s)"
        ) from None


async def _read(request: Request, limit: int, setting: str) -> bytes:
    too_large = PayloadTooLarge(f"request body over {limit} bytes ({setting})")
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ProtocolError("Content-Length is not a number")
    if length is not None and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def traceparent(trace_id: str) -> dict[str, str]:
    """W3C Trace Context for the upstream: the call's trace, a new span for Bastion's hop."""
    return {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def trace_id_of(request: Request) -> str | None:
    match = _TRACEPARENT.match(request.headers.get("traceparent", ""))
    return match.group(1) if match else None


class RefusalLimiter:
    """A token bucket per source address for refused credentials (`listen.refusals_per_s`,
    `listen.refusal_burst`). Every refusal is recorded while a source has tokens; past that it
    is answered 429 and not recorded, so no address can turn bad tokens into audit writes.
    Sources are remembered up to `MAX_SOURCES` (the least recently seen go first). Behind a
    proxy, every client shares the proxy's address: size the rate for it (docs/security.md)."""

    MAX_SOURCES = 10_000

    def __init__(self, per_s: float, burst: int) -> None:
        self.per_s = per_s
        self.burst = burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, source: str) -> None:
        """Take a token for one more recorded refusal from `source`, or raise TooManyRefusals."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(source, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_s)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            metrics.REFUSALS_SUPPRESSED.inc()
            wait = (1.0 - tokens) / self.per_s
            raise TooManyRefusals(
                f"too many refused credentials from this address; retry in {wait:.1f} s", wait
            )
        self._buckets[source] = (tokens - 1.0, now)
        if len(self._buckets) > self.MAX_SOURCES:
            self._buckets.popitem(last=False)


def source_of(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def explained(
    decision: Decision, audit_id: str, approval: dict[str, str] | None
) -> tuple[str, dict[str, Any]]:
    """A refusal as text a model can read, and as data: decision, reasons, audit id (and, for a
    held call, the approval to ask for)."""
    text = (
        "; ".join(
            f"denied by policy {r.policy}: {r.reason}" if r.reason else f"denied by policy {r.policy}"
            for r in decision.reasons
        )
        or "denied"
    )
    data: dict[str, Any] = {
        "decision": decision.effect,
        "reasons": [r.to_json() for r in decision.reasons],
        "audit_id": audit_id,
    }
    if approval is not None:
        text = (
            f"approval required: {approval['approval_id']}; "
            f"ask {approval['approvers']} ({approval['approval_url']})"
        )
        data |= {"approval_id": approval["approval_id"], "approval_url": approval["approval_url"]}
    return text, data
