"""The LLM API front: `POST /llm/{provider}/v1/{messages | chat/completions | responses}`.

One model call, top to bottom:

    identity    the caller's Bearer token or Bastion API key (`Authorization`, or `x-api-key` as
                the Anthropic SDK sends it), meant for this provider; refusals are recorded
    body        bounded (`llm.max_body_bytes`), strict JSON (no duplicate keys, bounded depth)
    to model    tool results in the conversation redacted and scanned for prompt injection (the
                new ones recorded); the conversation's text redacted with `llm.redact_prompts`
    forward     to the provider with Bastion's credential, never the caller's
    from model  each tool call decided by the pipeline (`judge.py`), released as decided or
                replaced by its refusal; a stream passes text on as it arrives and holds each
                tool call until it is decided
    errors      in the provider's own shape, so the SDKs raise them; a provider that fails or
                answers something unreadable fails the request (nothing passes ungoverned)

Provider errors (4xx/5xx) are relayed as the provider sent them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway import metrics
from gateway.call import Principal, ToolCall, new_trace_id
from gateway.config import LLMConfig
from gateway.errors import AuthError, BastionError, ProtocolError, TooManyRefusals, UpstreamError
from gateway.fronts.client_info import client_name
from gateway.fronts.jsonrpc import parse_json
from gateway.fronts.llm.anthropic import Messages
from gateway.fronts.llm.dialect import Dialect
from gateway.fronts.llm.judge import Judge, Seen
from gateway.fronts.llm.openai_chat import ChatCompletions
from gateway.fronts.llm.openai_responses import Responses
from gateway.fronts.wire import RefusalLimiter, read_body, source_of, trace_id_of
from gateway.identity.authenticator import Authenticator
from gateway.pipeline import Pipeline
from gateway.upstreams.llm_provider import Provider
from gateway.upstreams.streamable_http import Reply

log = logging.getLogger("bastion.llm")

_UNKNOWN = ("openai", ChatCompletions())
"""Answers a path that names no API (in OpenAI's error shape: it names no provider's either)."""
RELAYED_HEADERS = frozenset({"retry-after", "retry-after-ms", "request-id", "x-request-id"})
SESSION_HEADER = "x-bastion-session"
"""Names the conversation for taint (`context.session.tainted`); without it, the caller's agent."""
_SESSION = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


class LLMFront:
    """Serves the model APIs of the configured providers; see the module docstring."""

    def __init__(
        self,
        pipeline: Pipeline,
        auth: Authenticator,
        providers: Mapping[str, Provider],
        cfg: LLMConfig,
        base_url: str,
        limits: tuple[int, float],
        refusals: RefusalLimiter,
    ) -> None:
        self.pipeline = pipeline
        self.base_url = base_url
        self.auth = auth
        self.providers = providers
        self.cfg = cfg
        self.max_depth, self.body_timeout_s = limits
        self.refusals = refusals
        self.seen = Seen()
        self.apis: dict[str, tuple[str, Dialect]] = {
            "messages": ("anthropic", Messages()),
            "chat/completions": ("openai", ChatCompletions()),
            "responses": ("openai", Responses()),
        }

    async def __call__(self, request: Request) -> Response:
        name, api = request.path_params["provider"], request.path_params["api"]
        kind, dialect = self.apis.get(api, _UNKNOWN)
        provider = self.providers.get(name)
        if api not in self.apis or provider is None or provider.kind != kind:
            why = f"no model API at {request.url.path[:200]} (see llm.providers)"
            return _error(dialect, 404, why)
        response = await self._serve(request, name, api, provider, dialect)
        metrics.LLM_REQUESTS.labels(name, api, str(response.status_code)).inc()
        return response

    async def _serve(
        self, request: Request, name: str, api: str, provider: Provider, dialect: Dialect
    ) -> Response:
        try:
            principal = await self._authenticate(request, name, api)
            body = await read_body(
                request, self.cfg.max_body_bytes, self.body_timeout_s, "llm.max_body_bytes"
            )
            doc = parse_json(body, self.max_depth)
            if not isinstance(doc, dict):
                raise ProtocolError("the body must be a JSON object")
            model, stream = doc.get("model"), doc.get("stream", False)
            if not isinstance(model, str) or not model or not isinstance(stream, bool):
                raise ProtocolError('"model" must be a non-empty string and "stream" a boolean')
            judge = Judge(
                self.pipeline,
                self.cfg.tools,
                principal,
                provider=name,
                model=model,
                client=client_name(request.headers),
                session=_session(request),
                trace_id=trace_id_of(request) or new_trace_id(),
                seen=self.seen,
            )
            sent = await self._to_model(dialect, doc, judge, body)
            reply = await provider.send(f"/v1/{api}", sent, request.headers, stream)
            headers = _relayed(reply.response.headers)
            if reply.status >= 400:
                raw = await reply.body()
                ctype = reply.response.headers.get("content-type", "application/json")
                return Response(raw, reply.status, headers, media_type=ctype)
            if reply.is_sse:
                events = self._relay(dialect, reply, judge)
                return StreamingResponse(events, headers=headers, media_type="text/event-stream")
            answer = await _answer(reply.body(), self.max_depth)
            return JSONResponse(await dialect.answer(answer, judge), headers=headers)
        except BastionError as err:
            return self._bastion_error(dialect, err)
        except Exception as exc:  # a bug: still an answer the SDKs can read (the call was recorded)
            log.error("model call through %s failed inside the gateway", name, exc_info=exc)
            return _error(dialect, 500, f"internal error ({type(exc).__name__})")

    async def _authenticate(self, request: Request, name: str, api: str) -> Principal:
        """The caller; a refused credential is recorded (rate-limited per address) and raised."""
        credential = request.headers.get("authorization")
        if credential is None and (key := request.headers.get("x-api-key")) is not None:
            credential = f"Bearer {key}"
        try:
            return await self.auth.authenticate(credential, provider=name)
        except AuthError as err:
            self.refusals.check(source_of(request))
            call = ToolCall(name, f"POST /v1/{api}", {}, protocol="llm", action="message")
            call.llm = {"provider": name, "model": ""}
            await self.pipeline.refuse(call, "identity", err.error, err.message)
            raise

    async def _to_model(self, dialect: Dialect, doc: dict[str, Any], judge: Judge, body: bytes) -> bytes:
        """The request as the provider gets it: tool results redacted and scanned, the
        conversation's text redacted when configured; the caller's bytes when nothing changed."""
        prepared = dialect.prepare(doc)
        if self.cfg.tools.hide_denied and await _hide_denied(dialect, doc, judge):
            prepared = True
        await judge.returned(dialect.results(doc))
        if self.cfg.redact_prompts:
            await judge.redact_prompts(dialect.texts(doc))
        if not prepared and not judge.changed:
            return body
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()

    async def _relay(self, dialect: Dialect, reply: Reply, judge: Judge) -> AsyncIterator[bytes]:
        """The stream as the agent gets it; a failure midway ends it with an error event. The
        provider's stream is closed here, however the relay ends (its connection is not reused)."""
        events = reply.events()
        try:
            async for out in dialect.relay(events, judge):
                yield out
        except BastionError as err:
            log.warning("model stream from %s failed: %s", judge.llm["provider"], err.message)
            yield dialect.stream_error(err.message)
        except Exception as exc:
            log.error("model stream from %s failed inside the gateway", judge.llm["provider"], exc_info=exc)
            yield dialect.stream_error(f"internal error ({type(exc).__name__})")
        finally:
            await events.aclose()
            await reply.aclose()

    def _bastion_error(self, dialect: Dialect, err: BastionError) -> Response:
        headers: dict[str, str] = {}
        if isinstance(err, TooManyRefusals):
            headers["retry-after"] = str(max(1, round(err.retry_after_s)))
        if isinstance(err, AuthError):
            meta = f"{self.base_url}/.well-known/oauth-protected-resource"
            headers["www-authenticate"] = self.auth.www_authenticate(meta, err)
        return _error(dialect, err.http_status, err.message, headers)


async def _hide_denied(dialect: Dialect, doc: dict[str, Any], judge: Judge) -> bool:
    """Drop the declared tools the caller may never call (`llm.tools.hide_denied`); whether any was."""
    tools = doc.get("tools")
    if not isinstance(tools, list) or not tools:
        return False
    keep = await judge.offered([dialect.tool_name(t) for t in tools])
    if all(keep):
        return False
    doc["tools"] = [t for t, kept in zip(tools, keep, strict=True) if kept]
    if not doc["tools"]:  # the APIs refuse an empty list, and these without tools
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            doc.pop(key, None)
    return True


async def _answer(body: Awaitable[bytes], max_depth: int) -> dict[str, Any]:
    """The provider's whole answer, read as strictly as a request; unreadable is its failure."""
    try:
        answer = parse_json(await body, max_depth)
    except ProtocolError as err:
        raise UpstreamError(f"the provider's answer cannot be read: {err.message}") from None
    if not isinstance(answer, dict):
        raise UpstreamError("the provider answered something other than a JSON object")
    return answer


def _relayed(headers: Mapping[str, str]) -> dict[str, str]:
    """The provider's response headers the SDKs use (request ids in their errors and logs, rate
    limits and Retry-After for their back-off); nothing else of the provider's is passed on."""
    return {
        k: v
        for k, v in headers.items()
        if k in RELAYED_HEADERS or k.startswith(("x-ratelimit-", "anthropic-ratelimit-"))
    }


def _error(dialect: Dialect, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(dialect.error(status, message), status, headers=headers)


def _session(request: Request) -> str | None:
    value = request.headers.get(SESSION_HEADER)
    if value is None:
        return None
    if not _SESSION.fullmatch(value):
        raise ProtocolError(
            f"the {SESSION_HEADER} header must be 1 to 128 characters of letters, digits and ._:@-"
        )
    return f"llm:{value}"
