"""A small typed client for Bastion's HTTP tool API (`/v1/tool-calls`, `/v1/decisions`).

It speaks HTTP to a running gateway and imports nothing from it. Every answer Bastion can give
maps to one outcome:

    200 /v1/tool-calls      -> ToolResult (a tool-level error is a result with is_error=True)
    200 /v1/decisions       -> Decision (whatever the effect: the question was answered)
    202, or decision approval_required -> ApprovalRequired   (ToolDenied)
    403 with a decision     -> ToolDenied
    429                     -> BudgetExceeded                (ToolDenied), retry_after_s
    502 / 504               -> UpstreamFailed
    401, 403 without one    -> CredentialRejected
    400 / 404 / 413         -> BadRequest
    anything else, or no answer -> GatewayError

    BastionError
     +-- ToolDenied
     |    +-- BudgetExceeded
     |    +-- ApprovalRequired
     +-- UpstreamFailed
     +-- ToolError          (raised by ToolResult.raise_for_error; the tool itself said error)
     +-- CredentialRejected
     +-- BadRequest
     +-- GatewayError

Each exception carries the reasons, the audit id and the call id, so a caller can quote the
audit record. Every call has a `call_id` (given, or a new UUID) and a W3C `traceparent` (given,
the active OpenTelemetry span's, or a new trace), and names the calling framework in the
`X-Bastion-Client` header so that the audit record says which framework made the call.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = [
    "DEFAULT_CLIENT",
    "ApprovalRequired",
    "AsyncBastionClient",
    "BadRequest",
    "BastionClient",
    "BastionError",
    "BudgetExceeded",
    "CredentialRejected",
    "Decision",
    "GatewayError",
    "Reason",
    "ToolDenied",
    "ToolError",
    "ToolResult",
    "ToolSpec",
    "UpstreamFailed",
    "new_traceparent",
]

DEFAULT_CLIENT = "bastion-python/0.1"
CLIENT_HEADER = "X-Bastion-Client"
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_CLIENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+:@() -]{0,99}")

Token = str | Callable[[], str]


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason for a decision: the policy (or stage) that determined it, and its text."""

    policy: str
    reason: str

    def __str__(self) -> str:
        return f"denied by policy {self.policy}: {self.reason}" if self.reason else f"denied by {self.policy}"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool offered by a governed upstream, as its `tools/list` (filtered by policy) shows it."""

    upstream: str
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The upstream's MCP `CallToolResult`, plus what Bastion decided and where it is recorded."""

    content: list[dict[str, Any]]
    structured: Any
    is_error: bool
    decision: str
    audit_id: str
    call_id: str
    trace_id: str
    raw: dict[str, Any] = field(repr=False)

    @property
    def text(self) -> str:
        """The text blocks joined; the structured content as JSON when there is no text."""
        texts = [str(c.get("text", "")) for c in self.content if c.get("type") == "text"]
        if texts:
            return "\n".join(texts)
        if self.structured is not None:
            return json.dumps(self.structured, ensure_ascii=False)
        return ""

    def raise_for_error(self) -> ToolResult:
        """Raise ToolError when the tool answered with `isError`; return self otherwise."""
        if self.is_error:
            raise ToolError(
                self.text or "the tool reported an error",
                status=200,
                audit_id=self.audit_id,
                call_id=self.call_id,
            )
        return self


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of `/v1/decisions`: the effect, why, and (for `transform`) the arguments to use."""

    effect: str
    reasons: tuple[Reason, ...]
    stage: str | None
    policy_version: str | None
    audit_id: str
    call_id: str
    trace_id: str
    arguments: dict[str, Any] | None = None
    """Redacted arguments the caller should run the tool with, when the effect is `transform`."""
    retry_after_s: int | None = None

    @property
    def allowed(self) -> bool:
        return self.effect in ("allow", "transform")

    @property
    def reason(self) -> str:
        return _reason_text(self.reasons, self.effect)


class BastionError(Exception):
    """Base of every error this client raises; `str()` is a text a person (or a model) can read."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        audit_id: str | None = None,
        call_id: str | None = None,
        reasons: tuple[Reason, ...] = (),
        stage: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.audit_id = audit_id
        self.call_id = call_id
        self.reasons = reasons
        self.stage = stage
        self.body = body

    @property
    def reason(self) -> str:
        return self.message


class ToolDenied(BastionError):
    """Bastion refused the call (policy, scope, redaction rule): the tool did not run."""


class BudgetExceeded(ToolDenied):
    """Over a budget; `retry_after_s` is when its window resets (None when unknown)."""

    def __init__(self, message: str, *, retry_after_s: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class ApprovalRequired(ToolDenied):
    """A human must approve the call first; `approval_id` names the request when Bastion made one."""

    def __init__(self, message: str, *, approval_id: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.approval_id = approval_id


class UpstreamFailed(BastionError):
    """Allowed, but the tool server failed or timed out (`timed_out`); the call may have run."""

    def __init__(self, message: str, *, timed_out: bool = False, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.timed_out = timed_out


class ToolError(BastionError):
    """The tool ran and answered with `isError`."""


class CredentialRejected(BastionError):
    """No, a bad, or an insufficient credential (401, or 403 for a missing scope)."""


class BadRequest(BastionError):
    """The request itself is wrong (unknown upstream, malformed arguments, too large)."""


class GatewayError(BastionError):
    """Bastion could not be reached, or answered something this client does not understand."""


def new_traceparent() -> str:
    """A W3C traceparent starting a new, sampled trace."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _otel_traceparent() -> str | None:
    """The active OpenTelemetry span as a traceparent, when the API is installed and a span is active."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def resolve_traceparent(given: str | None) -> str:
    """The traceparent to send: the one given (checked), the active span's, or a new trace."""
    if given is None:
        return _otel_traceparent() or new_traceparent()
    match = _TRACEPARENT.fullmatch(given.strip())
    if not match or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        raise ValueError(
            f"traceparent {given[:80]!r} is not a W3C traceparent like "
            "'00-<32 hex trace id>-<16 hex span id>-01' (ids not all zero)"
        )
    return given.strip()


class _Core:
    """What both clients share: settings, request building, and the mapping of answers to outcomes."""

    def __init__(self, base_url: str, token: Token, client: str, timeout: float) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url {base_url!r} must be an http(s) URL like http://127.0.0.1:8080")
        if not _CLIENT.fullmatch(client):
            raise ValueError(f"client {client!r} must look like 'name/version' (letters, digits, ._/+:@()-)")
        self.base_url = str(url).rstrip("/")
        self.client = client
        self.timeout = timeout
        self._token = token

    def token(self) -> str:
        value = self._token() if callable(self._token) else self._token
        if not value:
            raise CredentialRejected("no token: pass token=... to the client")
        return value

    def prepare(
        self,
        upstream: str,
        tool: str,
        arguments: Mapping[str, Any] | None,
        call_id: str | None,
        traceparent: str | None,
        client_info: str | None,
    ) -> tuple[dict[str, Any], dict[str, str], str, str]:
        call_id = call_id or str(uuid.uuid4())
        trace = resolve_traceparent(traceparent)
        client = client_info or self.client
        if not _CLIENT.fullmatch(client):
            raise ValueError(f"client_info {client!r} must look like 'name/version'")
        body = {"upstream": upstream, "tool": tool, "arguments": dict(arguments or {}), "call_id": call_id}
        headers = {
            "authorization": f"Bearer {self.token()}",
            "traceparent": trace,
            CLIENT_HEADER: client,
            "user-agent": client,
        }
        return body, headers, call_id, trace.split("-")[1]

    def mcp_url(self, upstream: str) -> str:
        return f"{self.base_url}/mcp/{upstream}"


def _reason_text(reasons: tuple[Reason, ...], fallback: str) -> str:
    return "; ".join(str(r) for r in reasons) or fallback


def _reasons(body: Mapping[str, Any]) -> tuple[Reason, ...]:
    raw = body.get("reasons")
    if not isinstance(raw, list):
        return ()
    return tuple(
        Reason(str(r.get("policy", "")), str(r.get("reason", ""))) for r in raw if isinstance(r, Mapping)
    )


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise GatewayError(
            f"Bastion answered HTTP {response.status_code} with a body that is not a JSON object",
            status=response.status_code,
            body=response.text[:500],
        )
    return body


def _retry_after(response: httpx.Response, body: Mapping[str, Any]) -> int | None:
    for value in (response.headers.get("retry-after"), body.get("retry_after_s")):
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            continue
    return None


def _raise_for(response: httpx.Response, call_id: str) -> dict[str, Any]:
    """The body of a 200 answer; every other answer becomes its typed exception."""
    status = response.status_code
    body = _json_body(response)
    common: dict[str, Any] = {
        "status": status,
        "audit_id": body.get("audit_id"),
        "call_id": call_id,
        "reasons": _reasons(body),
        "stage": body.get("stage") if isinstance(body.get("stage"), str) else None,
        "body": body,
    }
    if status == 200:
        return body
    decision = body.get("decision")
    error = body.get("error")
    detail = error.get("message") if isinstance(error, Mapping) else body.get("message")
    if status == 202 or decision == "approval_required":
        approval = body.get("approval_id")
        raise ApprovalRequired(
            _reason_text(common["reasons"], "a human must approve this call first"),
            approval_id=str(approval) if approval is not None else None,
            **common,
        )
    if status == 429:
        raise BudgetExceeded(
            _reason_text(common["reasons"], "over budget"),
            retry_after_s=_retry_after(response, body),
            **common,
        )
    if status == 403 and decision is not None:
        raise ToolDenied(_reason_text(common["reasons"], "denied"), **common)
    if status in (401, 403):
        raise CredentialRejected(str(detail or f"credential rejected (HTTP {status})"), **common)
    if status in (502, 504):
        what = "timed out" if status == 504 else "failed"
        raise UpstreamFailed(f"the tool server {what}: {detail or error}", timed_out=status == 504, **common)
    if status in (400, 404, 413):
        raise BadRequest(str(detail or f"bad request (HTTP {status})"), **common)
    raise GatewayError(f"Bastion answered HTTP {status}: {detail or error or ''}".rstrip(": "), **common)


def _tool_result(body: dict[str, Any], call_id: str, trace_id: str) -> ToolResult:
    result = body.get("result")
    if not isinstance(result, dict):
        raise GatewayError("Bastion answered 200 without a tool result", status=200, body=body)
    content = result.get("content")
    return ToolResult(
        content=[c for c in content if isinstance(c, dict)] if isinstance(content, list) else [],
        structured=result.get("structuredContent"),
        is_error=bool(result.get("isError")),
        decision=str(body.get("decision", "allow")),
        audit_id=str(body.get("audit_id", "")),
        call_id=call_id,
        trace_id=trace_id,
        raw=result,
    )


def _decision(body: dict[str, Any], call_id: str, trace_id: str) -> Decision:
    arguments = body.get("arguments")
    retry = body.get("retry_after_s")
    return Decision(
        effect=str(body.get("decision", "deny")),
        reasons=_reasons(body),
        stage=body.get("stage") if isinstance(body.get("stage"), str) else None,
        policy_version=body.get("policy_version") if isinstance(body.get("policy_version"), str) else None,
        audit_id=str(body.get("audit_id", "")),
        call_id=call_id,
        trace_id=trace_id,
        arguments=arguments if isinstance(arguments, dict) else None,
        retry_after_s=retry if isinstance(retry, int) else None,
    )


def _transport_error(exc: httpx.HTTPError, base_url: str, call_id: str) -> GatewayError:
    return GatewayError(
        f"could not reach Bastion at {base_url}: {type(exc).__name__}: {exc}", call_id=call_id
    )


async def _list_tools(core: _Core, upstream: str) -> list[ToolSpec]:
    """`tools/list` of one upstream through Bastion's MCP endpoint (so policy filters the list)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.types import Implementation

    name, _, version = core.client.partition("/")
    headers = {"authorization": f"Bearer {core.token()}", CLIENT_HEADER: core.client}
    specs: list[ToolSpec] = []
    try:
        async with httpx2.AsyncClient(headers=headers, timeout=core.timeout) as http:
            transport = streamable_http_client(core.mcp_url(upstream), http_client=http)
            info = Implementation(name=name, version=version or "0")
            async with Client(transport, client_info=info) as mcp:
                cursor: str | None = None
                while True:
                    page = await mcp.list_tools(cursor=cursor)
                    specs.extend(
                        ToolSpec(upstream, t.name, t.description or "", dict(t.input_schema))
                        for t in page.tools
                    )
                    cursor = page.next_cursor
                    if not cursor:
                        return specs
    except BastionError:
        raise
    except Exception as exc:
        raise GatewayError(
            f"could not list the tools of upstream {upstream!r} at {core.mcp_url(upstream)}: {exc}"
        ) from exc


class BastionClient:
    """Synchronous client (httpx). Thread-safe; reuse one per process, close it when done.

    `token` is a JWT or API key, or a callable returning one (called per request, for rotation).
    `client` names the calling framework in the audit record (`X-Bastion-Client`).
    """

    def __init__(
        self,
        base_url: str,
        token: Token,
        *,
        client: str = DEFAULT_CLIENT,
        timeout: float = 30.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._core = _Core(base_url, token, client, timeout)
        self._http = http_client or httpx.Client(timeout=timeout)
        self._owns_http = http_client is None

    @property
    def base_url(self) -> str:
        return self._core.base_url

    @property
    def client(self) -> str:
        return self._core.client

    def call_tool(
        self,
        upstream: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        call_id: str | None = None,
        *,
        traceparent: str | None = None,
        client_info: str | None = None,
    ) -> ToolResult:
        """Decide, forward and audit one call; the tool's result, or a typed exception."""
        body, headers, call_id, trace_id = self._core.prepare(
            upstream, tool, arguments, call_id, traceparent, client_info
        )
        answer = self._post("/v1/tool-calls", body, headers, call_id)
        return _tool_result(_raise_for(answer, call_id), call_id, trace_id)

    def decide(
        self,
        upstream: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        call_id: str | None = None,
        *,
        traceparent: str | None = None,
        client_info: str | None = None,
    ) -> Decision:
        """Decide and audit without forwarding (an allow consumes budgets: you run the tool)."""
        body, headers, call_id, trace_id = self._core.prepare(
            upstream, tool, arguments, call_id, traceparent, client_info
        )
        answer = self._post("/v1/decisions", body, headers, call_id)
        return _decision(_raise_for(answer, call_id), call_id, trace_id)

    def list_tools(self, upstream: str) -> list[ToolSpec]:
        """The upstream's tools this caller may see. Runs its own event loop: not from async code."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(_list_tools(self._core, upstream))
        raise RuntimeError("BastionClient.list_tools was called inside an event loop: use AsyncBastionClient")

    def _post(self, path: str, body: dict[str, Any], headers: dict[str, str], call_id: str) -> httpx.Response:
        try:
            return self._http.post(f"{self._core.base_url}{path}", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self._core.base_url, call_id) from exc

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> BastionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBastionClient:
    """Asynchronous client (httpx.AsyncClient), the same methods as `BastionClient`."""

    def __init__(
        self,
        base_url: str,
        token: Token,
        *,
        client: str = DEFAULT_CLIENT,
        timeout: float = 30.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._core = _Core(base_url, token, client, timeout)
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._owns_http = http_client is None

    @property
    def base_url(self) -> str:
        return self._core.base_url

    @property
    def client(self) -> str:
        return self._core.client

    async def call_tool(
        self,
        upstream: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        call_id: str | None = None,
        *,
        traceparent: str | None = None,
        client_info: str | None = None,
    ) -> ToolResult:
        """Decide, forward and audit one call; the tool's result, or a typed exception."""
        body, headers, call_id, trace_id = self._core.prepare(
            upstream, tool, arguments, call_id, traceparent, client_info
        )
        answer = await self._post("/v1/tool-calls", body, headers, call_id)
        return _tool_result(_raise_for(answer, call_id), call_id, trace_id)

    async def decide(
        self,
        upstream: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        call_id: str | None = None,
        *,
        traceparent: str | None = None,
        client_info: str | None = None,
    ) -> Decision:
        """Decide and audit without forwarding (an allow consumes budgets: you run the tool)."""
        body, headers, call_id, trace_id = self._core.prepare(
            upstream, tool, arguments, call_id, traceparent, client_info
        )
        answer = await self._post("/v1/decisions", body, headers, call_id)
        return _decision(_raise_for(answer, call_id), call_id, trace_id)

    async def list_tools(self, upstream: str) -> list[ToolSpec]:
        """The upstream's tools this caller may see (MCP `tools/list` through Bastion)."""
        return await _list_tools(self._core, upstream)

    async def _post(
        self, path: str, body: dict[str, Any], headers: dict[str, str], call_id: str
    ) -> httpx.Response:
        try:
            return await self._http.post(f"{self._core.base_url}{path}", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self._core.base_url, call_id) from exc

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncBastionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
