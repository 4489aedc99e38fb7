"""Bastion's one exception tree. Each error has a stable `code`, an HTTP status and a JSON-RPC code.

    BastionError
    ├── ConfigError          bad config or policy set: stops start-up (never seen by a client)
    ├── AuthError            401, with WWW-Authenticate pointing at the RFC 9728 metadata
    │   └── InsufficientScope 403, error="insufficient_scope" and the scope needed
    ├── ForbiddenError       403: a foreign Origin, a session presented by another principal
    ├── ProtocolError        400: not one JSON-RPC message, duplicate keys, header/body mismatch
    │   ├── PayloadTooLarge  413: a body over listen.max_body_bytes
    │   └── BodyTimeout      408: a body slower than listen.body_timeout_s
    ├── SessionError         400 missing / 404 unknown or expired MCP session
    ├── UpstreamError        502: the tool server failed or could not be reached
    │   ├── UpstreamTimeout  504
    │   ├── BrokenReply      502: it answered, unusably (malformed, empty, cut off): the tool may have run
    │   ├── CircuitOpen      503: the upstream's breaker is open, the call was not sent
    │   └── DeadLetter       502/504: an idempotent call failed on every retry
    ├── TooManyRefusals      429: this address sent too many refused credentials; nothing recorded
    ├── AuditUnavailable     503: the audit store cannot record, so nothing is forwarded
    ├── PinsUnavailable      503: the tool pins (state DB) cannot be read, so no tool is listed
    ├── StateUnavailable     503: the state DB cannot say whether a call_id ran, so it is not forwarded
    ├── DuplicateCall        409: a repeated call_id; the tool is not run again
    └── ApprovalError        404/409/403/...: an approval cannot be decided (unknown, decided, expired)

Third-party exceptions (httpx, cedarpy, SQLAlchemy, pyjwt) are translated where they are called,
chained with `raise ... from exc`, so a front maps one tree to the wire in one place.
"""

from __future__ import annotations

from typing import Any


class BastionError(Exception):
    code = "internal"
    http_status = 500
    jsonrpc_code = -32603

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


class ConfigError(BastionError):
    """A config or policy problem; `message` names the dotted key or file:line and the fix."""

    code = "config"


class AuthError(BastionError):
    """The credential is missing or not acceptable; `error` is the RFC 6750 error code."""

    code = "unauthenticated"
    http_status = 401
    jsonrpc_code = -32001

    def __init__(self, message: str, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.error = error


class InsufficientScope(AuthError):
    """A valid credential without a scope this resource requires (RFC 6750 §3.1)."""

    code = "insufficient_scope"
    http_status = 403
    jsonrpc_code = -32003

    def __init__(self, message: str, scope: str) -> None:
        super().__init__(message, error="insufficient_scope")
        self.scope = scope


class ForbiddenError(BastionError):
    code = "forbidden"
    http_status = 403
    jsonrpc_code = -32003


class ProtocolError(BastionError):
    code = "bad_request"
    http_status = 400
    jsonrpc_code = -32600

    def __init__(self, message: str, jsonrpc_code: int = -32600) -> None:
        super().__init__(message)
        self.jsonrpc_code = jsonrpc_code


class PayloadTooLarge(ProtocolError):
    code = "payload_too_large"
    http_status = 413


class BodyTimeout(ProtocolError):
    code = "request_timeout"
    http_status = 408


class TooManyRefusals(BastionError):
    """A source address over `listen.refusals_per_s` refused credentials: answered, not recorded."""

    code = "too_many_refusals"
    http_status = 429
    jsonrpc_code = -32001

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SessionError(BastionError):
    code = "session"
    http_status = 404
    jsonrpc_code = -32001

    def __init__(self, message: str, http_status: int = 404) -> None:
        super().__init__(message)
        self.http_status = http_status


class UpstreamError(BastionError):
    code = "upstream_failed"
    http_status = 502
    jsonrpc_code = -32002


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    http_status = 504


class CircuitOpen(UpstreamError):
    """Failing fast: the upstream failed too often lately; nothing was sent to it."""

    code = "circuit_open"
    http_status = 503

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BrokenReply(UpstreamError):
    """The upstream answered, but the answer was unusable (malformed, empty, broken off): the
    tool may have run."""


class DeadLetter(UpstreamError):
    """An idempotent call that failed on every attempt it was allowed; `last` is the final failure."""

    code = "upstream_dead_letter"

    def __init__(self, message: str, last: UpstreamError, attempts: int, upstream_status: int | None) -> None:
        super().__init__(message)
        self.last = last
        self.attempts = attempts
        self.upstream_status = upstream_status
        self.http_status = last.http_status


class AuditUnavailable(BastionError):
    code = "audit_unavailable"
    http_status = 503
    jsonrpc_code = -32004


class PinsUnavailable(BastionError):
    code = "pins_unavailable"
    http_status = 503
    jsonrpc_code = -32005


class StateUnavailable(BastionError):
    """The state database cannot tell whether this call_id ran already: the call is not forwarded."""

    code = "state_unavailable"
    http_status = 503
    jsonrpc_code = -32004


class DuplicateCall(BastionError):
    """A repeated call_id: the tool is not run again. `previous` is what the first call left."""

    code = "duplicate_call"
    http_status = 409
    jsonrpc_code = -32005

    def __init__(self, message: str, previous: Any) -> None:
        super().__init__(message)
        self.previous = previous


class ApprovalError(BastionError):
    """An approval cannot be decided: unknown id, already decided, expired, or not yours to decide."""

    code = "approval"
    jsonrpc_code = -32003

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.http_status = status

    @property
    def status(self) -> int:
        return self.http_status


class SinkError(Exception):
    """An audit sink did not confirm a delivery; the batch is sent again after a back-off."""
