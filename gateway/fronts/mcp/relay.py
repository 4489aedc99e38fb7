"""Upstream answers on the client's wire: JSON, or SSE relayed event by event as it arrives.

Two things come back from an upstream: the `Answer` to a governed message (its final response
already audited, and redacted where need be, by the pipeline) and the reply to a message relayed
without a decision (session housekeeping, listings, correlated messages). Both are put on the
client's wire here, in its era:

- a request that travelled under a private id (a shared upstream session) gets the client's id
  back, and a 2026-07-28 client of a legacy upstream the result fields its era requires;
- a listing's final response goes through its filter (`Hook`) before it is sent;
- a server-to-client request relayed on a shared session is remembered with the client it went
  to: only that client may answer it;
- `notifications/tools/list_changed` makes Bastion re-check the upstream's tool pins.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from httpx_sse import ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.fronts import jsonrpc
from gateway.fronts.mcp.eras import modernize
from gateway.fronts.mcp.exchange import Exchange
from gateway.fronts.mcp.sessions import Session
from gateway.pipeline import Answer, Event, Pipeline, response_to
from gateway.upstreams import forward
from gateway.upstreams.base import Upstream
from gateway.upstreams.forward import Outgoing, Private

log = logging.getLogger("bastion.mcp")

Hook = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
"""Rewrites a relayed final response before the client sees it (a listing's filter)."""
MAX_OUTPUT_SCHEMAS = 10_000
_LIST_CHANGED = "notifications/tools/list_changed"
_LIST_CHANGED_RAW = _LIST_CHANGED.encode()


class Relay:
    def __init__(self, pipeline: Pipeline, recheck: Callable[[str], Awaitable[bool]] | None) -> None:
        self.pipeline = pipeline
        self.recheck = recheck
        """Lists an upstream's tools again when it announces `notifications/tools/list_changed`."""
        self._output_schemas: dict[tuple[str, str], Any] = {}
        """Declared `outputSchema`s seen in relayed `tools/list` results, keyed (upstream, tool)."""

    # -- governed answers -----------------------------------------------------------------------

    def answer(self, x: Exchange, answer: Answer) -> Response:
        """A forwarded governed message's answer: relayed as JSON, an SSE stream, or an HTTP error."""
        echo = _echo(x)
        if answer.status >= 400:
            return Response(answer.raw, answer.status, media_type=answer.content_type, headers=echo)
        if answer.events is not None:
            return self._stream(x, answer.events, answer.private)
        assert answer.message is not None
        raw = answer.raw
        if answer.private is not None or raw is None:
            raw = jsonrpc.dumps(self._for_client(x, answer.message, answer.private))
        return Response(raw, media_type="application/json", headers=echo)

    # -- relayed without a decision -------------------------------------------------------------

    async def passthrough(
        self, x: Exchange, hook: Hook | None = None, out: Outgoing | None = None
    ) -> Response:
        """Relay a message that is not a governed action; `hook` rewrites its final response."""
        out = out or x.outgoing()
        long_lived = x.method == "subscriptions/listen"
        # Everything but a subscription must be over within the upstream's timeout_s, however
        # slowly it trickles (httpx's timeouts bound each read, not the whole answer).
        deadline = None if long_lived else asyncio.get_running_loop().time() + x.upstream.cfg.timeout_s
        reply, private = await self.pipeline.relay(x.upstream.name, out, long_lived)
        if reply.status == 202:
            await reply.aclose()
            forward.release(x.upstream, private)
            return Response(status_code=202, headers=_echo(x))
        if reply.status >= 400 or not reply.is_sse:
            try:
                async with asyncio.timeout_at(deadline):
                    raw = await reply.body()
            except TimeoutError:
                raise UpstreamTimeout(f"upstream {x.upstream.name} did not answer in time") from None
            forward.release(x.upstream, private)
            if reply.status >= 400 or (hook is None and private is None):
                ctype = reply.response.headers.get("content-type") or "application/json"
                return Response(raw, reply.status, media_type=ctype, headers=_echo(x))
            try:
                msg = json.loads(raw)
            except ValueError:
                raise UpstreamError("upstream answered with malformed JSON") from None
            if not isinstance(msg, dict):
                raise UpstreamError("upstream answered something other than a JSON-RPC object")
            if hook is not None:
                msg = await hook(msg)
            return Response(
                jsonrpc.dumps(self._for_client(x, msg, private)),
                media_type="application/json",
                headers=_echo(x),
            )
        upstream_id = private.id if private is not None else x.msg.get("id")
        events = _until(reply.events(), deadline, x.upstream.name)
        return self._stream(x, self._events(x.upstream, events, upstream_id, private, hook), private)

    async def _events(
        self,
        up: Upstream,
        events: AsyncIterator[ServerSentEvent],
        upstream_id: Any,
        private: Private | None,
        hook: Hook | None,
    ) -> AsyncIterator[Event]:
        try:
            async for sse in events:
                final = None
                if (hook is not None or private is not None) and (msg := response_to(sse.data, upstream_id)):
                    forward.release(up, private)
                    final = await hook(msg) if hook is not None else msg
                yield Event(sse.data, sse.id or None, sse.event or "message", final)
        finally:
            forward.release(up, private)

    # -- the wire -------------------------------------------------------------------------------

    def _for_client(self, x: Exchange, msg: dict[str, Any], private: Private | None) -> dict[str, Any]:
        if private is not None:
            msg["id"] = private.client_id
            if x.modern:
                modernize(msg, x.method)
        return msg

    def _stream(self, x: Exchange, events: AsyncIterator[Event], private: Private | None) -> Response:
        return StreamingResponse(
            self._sse(x, events, private),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", **_echo(x)},
        )

    async def _sse(
        self, x: Exchange, events: AsyncIterator[Event], private: Private | None
    ) -> AsyncIterator[bytes]:
        shared = private is not None  # it travelled on a shared upstream session
        try:
            async for event in events:
                data = event.data
                if _LIST_CHANGED in data:
                    self.tools_changed(x.upstream.name)
                if event.final is not None:
                    data = jsonrpc.dumps(self._for_client(x, event.final, private)).decode()
                elif shared and '"method"' in data and '"id"' in data:
                    self._server_request(x, data)
                yield jsonrpc.sse(data, event.id, event.event)
        except UpstreamError as err:
            yield jsonrpc.sse(jsonrpc.error(x.msg.get("id"), err.jsonrpc_code, err.message))

    def _server_request(self, x: Exchange, data: str) -> None:
        """A server-to-client request on a shared session: only this client may answer it."""
        try:
            msg = json.loads(data)
        except ValueError:
            return
        if isinstance(msg, dict) and "method" in msg and isinstance(msg.get("id"), str | int):
            forward.remember(x.upstream.shared.server_requests, str(msg["id"]), x.owner)

    # -- the legacy GET stream ------------------------------------------------------------------

    async def server_stream(self, request: Request, upstream: Upstream, session: Session | None) -> Response:
        """The legacy server stream of a client session that has an upstream session of its own."""
        if session is None or session.upstream_session is None:
            why = "no server stream: GET needs a legacy session with an upstream that keeps sessions"
            return Response(
                jsonrpc.error(None, -32000, why),
                405,
                media_type="application/json",
                headers={"allow": "POST"},
            )
        hdrs = {"mcp-session-id": session.upstream_session, "mcp-protocol-version": session.version}
        if last := request.headers.get("last-event-id"):
            hdrs["last-event-id"] = last
        reply = await upstream.send("GET", None, hdrs, long_lived=True)
        if reply.status != 200 or not reply.is_sse:
            return Response(
                await reply.body(), reply.status, media_type=reply.response.headers.get("content-type")
            )

        async def raw() -> AsyncIterator[bytes]:
            try:
                async for chunk in reply.response.aiter_raw():
                    if _LIST_CHANGED_RAW in chunk:
                        self.tools_changed(upstream.name)
                    yield chunk
            except Exception as exc:
                log.debug("GET stream from %s ended: %s", upstream.name, type(exc).__name__)
            finally:
                await reply.aclose()

        return StreamingResponse(raw(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    # -- tool bookkeeping -----------------------------------------------------------------------

    def tools_changed(self, upstream: str) -> None:
        """The upstream announced a new tool list: re-check its pins now rather than at the next list."""
        if self.pipeline.pins is not None and self.recheck is not None:
            recheck = self.recheck

            async def run() -> None:
                await recheck(upstream)

            self.pipeline.later(run())

    def remember_output_schemas(self, upstream: str, tools: list[dict[str, Any]]) -> None:
        """Clients validate `structuredContent` against the schemas they were listed, even on errors."""
        for tool in tools:
            key = (upstream, tool["name"])
            schema = tool.get("outputSchema")
            if isinstance(schema, dict):
                if key in self._output_schemas or len(self._output_schemas) < MAX_OUTPUT_SCHEMAS:
                    self._output_schemas[key] = schema
            else:
                self._output_schemas.pop(key, None)

    def output_schema(self, upstream: str, tool: str) -> Any:
        return self._output_schemas.get((upstream, tool))


async def _until(
    events: AsyncGenerator[ServerSentEvent, None], deadline: float | None, upstream: str
) -> AsyncIterator[ServerSentEvent]:
    """The events of a stream, up to `deadline` (None: as long as it lasts)."""
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise UpstreamTimeout(f"upstream {upstream} did not finish its answer in time") from None
            yield event
    finally:
        await events.aclose()


def _echo(x: Exchange) -> dict[str, str]:
    return {"mcp-session-id": x.session_id} if x.session_id else {}
