"""What every HTTP front reads the same way: a bounded body and the W3C trace context."""

from __future__ import annotations

import re
import secrets

from starlette.requests import Request

from gateway.errors import PayloadTooLarge, ProtocolError

MAX_BODY = 1024 * 1024
"""Default of listen.max_body_bytes."""
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused (413) as soon as it is known to be over `limit` bytes."""
    too_large = PayloadTooLarge(f"request body over {limit} bytes (listen.max_body_bytes)")
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
