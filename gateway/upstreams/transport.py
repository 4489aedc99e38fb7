"""A lean keep-alive HTTP/1.1 transport for httpx, for `http://` upstreams.

httpcore's pool scans every connection on each request and wraps each socket operation in
several layers; at a few hundred calls per second that is a large share of Bastion's CPU. This
transport keeps httpx's `AsyncClient` (auth, timeouts, `Response`, SSE on top) and replaces only
what sits under it: asyncio streams, `httptools` to parse responses, a LIFO stack of idle
connections per origin.

Contract:
- `http://` only; any other scheme (`https://`) goes to the fallback (httpx's default
  httpcore transport), which also handles TLS, HTTP/2 and proxies.
- The response body is streamed as it arrives (SSE event by event), never read whole first.
- Timeouts come from `request.extensions["timeout"]` (connect, read per receive, write, pool)
  and raise httpx's own exceptions, so callers map errors as they would with httpcore.
- A connection is reused only after a complete response that allows keep-alive. It is closed
  after any error, an incomplete body, `Connection: close`, or an early `aclose()`.
- Nothing is ever sent twice: a request that fails on a reused connection is not retried.
  `httpx.ConnectError` / `ConnectTimeout` mean the request was never sent.
- At most `max_connections` requests are in flight (others wait up to the pool timeout), at
  most `max_keepalive_connections` connections are kept idle, each for `keepalive_expiry`.
- A request h11 would refuse to write raises `httpx.LocalProtocolError` (as httpx's own transport
  does) before a connection is taken or a byte written: the method must be a token, the target
  visible ASCII, exactly one Host, header names tokens, values without CR, LF, NUL or leading or
  trailing whitespace. Header values are held to a stricter rule than h11's, on purpose: visible
  ASCII, spaces and tabs only, so no other control character (h11 lets 0x01 or DEL through) and
  no byte above 0x7F (h11 passes obs-text on), which upstreams decode in different ways.
  `header_name_ok` / `header_value_ok` let other modules check names and values by the same
  rules before they build headers, and answer their caller with a better error than this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httptools
import httpx

READ_SIZE = 65536
DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
_Origin = tuple[str, int]

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]++"
_VALUE = rb"(?:[!-~]++(?:[ \t]++[!-~]++)*+)?+"
_NAME_RE = re.compile(_TOKEN)
_VALUE_RE = re.compile(_VALUE)
_VALUES_RE = re.compile(_VALUE + rb"(?:\n" + _VALUE + rb")*+")
_TARGET_RE = re.compile(rb"[!-~]++")
_NAME_STR = re.compile(_TOKEN.decode())
_VALUE_STR = re.compile(_VALUE.decode())
_NOT_TOKEN = re.compile(rb"[^-!#$%&'*+.^_`|~0-9A-Za-z]")
_NOT_VALUE = re.compile(rb"[^\t -~]")
_NOT_TARGET = re.compile(rb"[^!-~]")
_NAMED = {0x00: "NUL", 0x09: "HTAB", 0x0A: "LF", 0x0D: "CR", 0x20: "a space", 0x7F: "DEL"}
_FRAMING = (b"content-length", b"transfer-encoding")
_token_names: set[bytes] = set()
"""Header names already found to be tokens: Bastion sends a few dozen at most, each checked once."""
_TOKEN_NAMES_MAX = 1024


def header_name_ok(name: str) -> bool:
    """Whether `name` can be sent as a header name: an RFC 9110 token."""
    return _NAME_STR.fullmatch(name) is not None


def header_value_ok(value: str) -> bool:
    """Whether `value` can be sent as a header value by `LeanTransport`: visible ASCII, with spaces
    and tabs only between visible characters (no CR, LF, NUL, other controls or non-ASCII)."""
    return _VALUE_STR.fullmatch(value) is not None


def _encode(request: httpx.Request, body: bytes) -> bytes:
    """The request head, or `httpx.LocalProtocolError` if any part of it is not safe to write.

    Regex calls are most of the cost of the check, so there are few: each header name is checked
    once (`_token_names`), and all values in one match over them joined by LF, with a count of the
    LFs to catch a value holding one. `head` has four items for the request line and four per
    header, so `head[6::4]` are the values.
    """
    method = request.method.encode()
    target = request.url.raw_path
    if _NAME_RE.fullmatch(method) is None or _TARGET_RE.fullmatch(target) is None:
        raise _refusal(request)
    head = [method, b" ", target, b" HTTP/1.1\r\n"]
    hosts = 0
    for name, value in request.headers.raw:
        lname = name.lower()
        if lname in _FRAMING:
            continue
        if lname == b"host":
            hosts += 1
        if name not in _token_names:
            if _NAME_RE.fullmatch(name) is None:
                raise _refusal(request)
            if len(_token_names) < _TOKEN_NAMES_MAX:
                _token_names.add(name)
        head += (name, b": ", value, b"\r\n")
    values = head[6::4]
    joined = b"\n".join(values)
    if hosts != 1 or _VALUES_RE.fullmatch(joined) is None or joined.count(b"\n") != len(values) - 1:
        raise _refusal(request)
    if body or request.method not in ("GET", "DELETE", "OPTIONS"):
        head += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
    head.append(b"\r\n")
    return b"".join(head)


def _refusal(request: httpx.Request) -> httpx.LocalProtocolError:
    """Which part of a refused request head is wrong, and why, without echoing it whole."""
    method = request.method.encode()
    if _NAME_RE.fullmatch(method) is None:
        return httpx.LocalProtocolError(
            f"the HTTP method {_clip(method)} is not a token: it {_flaw(method, _NOT_TOKEN)}"
        )
    target = request.url.raw_path
    if _TARGET_RE.fullmatch(target) is None:
        return httpx.LocalProtocolError(f"the request target {_clip(target)} {_flaw(target, _NOT_TARGET)}")
    hosts = 0
    for name, value in request.headers.raw:
        lname = name.lower()
        if lname in _FRAMING:
            continue
        if lname == b"host":
            hosts += 1
        if _NAME_RE.fullmatch(name) is None:
            return httpx.LocalProtocolError(
                f"the header name {_clip(name)} is not a token: it {_flaw(name, _NOT_TOKEN)}"
            )
        if _VALUE_RE.fullmatch(value) is None:
            return httpx.LocalProtocolError(
                f"the value of header {_clip(name)} {_flaw(value, _NOT_VALUE)}: {_clip(value)}"
            )
    if hosts != 1:
        return httpx.LocalProtocolError(f"a request needs exactly one Host header, not {hosts}")
    return httpx.LocalProtocolError("the request head is malformed")


def _flaw(part: bytes, outside: re.Pattern[bytes]) -> str:
    """What is wrong with `part`: the first byte `outside` finds in it, or its shape."""
    if not part:
        return "is empty"
    bad = outside.search(part)
    if bad is not None:
        byte = part[bad.start()]
        what = _NAMED.get(byte) or (
            f"control character 0x{byte:02x}"
            if byte < 0x20
            else f"non-ASCII byte 0x{byte:02x}"
            if byte > 0x7F
            else repr(chr(byte))
        )
        return f"holds {what} at offset {bad.start()}"
    if part[:1] in b" \t":
        return "starts with whitespace"
    if part[-1:] in b" \t":
        return "ends with whitespace"
    return "holds whitespace"


def _clip(part: bytes, limit: int = 32) -> str:
    """`part` quoted, cut at `limit` bytes, every control or non-ASCII byte escaped."""
    return ascii(part[:limit].decode("latin-1")) + ("..." if len(part) > limit else "")


class _Connection:
    __slots__ = ("idle_since", "origin", "reader", "writer")

    def __init__(self, origin: _Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float | None) -> bool:
        """Still open, nothing unsolicited from the server (a 408, say), and not idle for too long."""
        return not (
            self.writer.is_closing()
            or self.reader.at_eof()
            or self.reader.exception() is not None
            or len(getattr(self.reader, "_buffer", b""))
            or (expiry is not None and now - self.idle_since > expiry)
        )

    def close(self) -> None:
        self.writer.close()


class _Exchange(httpx.AsyncByteStream):
    """One response on one connection: the httptools callbacks, then the body as a byte stream."""

    def __init__(self, transport: LeanTransport, conn: _Connection, read_timeout: float | None) -> None:
        self.transport = transport
        self.conn = conn
        self.read_timeout = read_timeout
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.chunks: list[bytes] = []
        self.head_done = False
        self.done = False
        self.messages = 0
        self.keep_alive = False
        self.released = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.messages += 1

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True
        self.keep_alive = self.parser.should_keep_alive() and self.messages == 1

    async def _receive(self) -> bool:
        """Feed the next bytes from the server to the parser; False at end of stream."""
        try:
            if self.read_timeout is None:
                data = await self.conn.reader.read(READ_SIZE)
            else:
                async with asyncio.timeout(self.read_timeout):
                    data = await self.conn.reader.read(READ_SIZE)
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out reading from the upstream") from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading from the upstream failed: {exc!r}") from exc
        if not data:
            return False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise httpx.RemoteProtocolError(f"malformed HTTP response: {exc}") from exc
        return True

    async def read_head(self) -> None:
        while not self.head_done:
            if not await self._receive():
                raise httpx.RemoteProtocolError("server disconnected without sending a response")

    def _until_close(self) -> bool:
        """A body without Content-Length or chunked framing, which ends when the server closes."""
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while True:
                if self.chunks:
                    chunks, self.chunks = self.chunks, []
                    yield chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if self.done:
                    break
                if not await self._receive():
                    if self._until_close():
                        self.done = True
                        self.keep_alive = False
                        continue
                    raise httpx.RemoteProtocolError("server disconnected before the response body ended")
        except BaseException:
            self._release(False)
            raise
        self._release(self.keep_alive)

    async def aclose(self) -> None:
        self._release(self.done and self.keep_alive)

    def _release(self, reusable: bool) -> None:
        if not self.released:
            self.released = True
            self.transport._release(self.conn, reusable)


class LeanTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 over asyncio streams for `http://`; other schemes (and HEAD) go to
    `fallback`, by default httpx's own transport, built on first use."""

    def __init__(
        self, limits: httpx.Limits = DEFAULT_LIMITS, fallback: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._limits = limits
        self._max_in_use = limits.max_connections
        self._max_idle = limits.max_keepalive_connections
        self._expiry = limits.keepalive_expiry
        self._fallback = fallback
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._idle_count = 0
        self._in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self.connections_opened = 0
        """How many connections this transport has opened (for tests and diagnostics)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http" or request.method == "HEAD":
            if self._fallback is None:
                self._fallback = httpx.AsyncHTTPTransport(limits=self._limits)
            return await self._fallback.handle_async_request(request)
        if self._closed:
            raise RuntimeError("the transport is closed")
        timeouts: Mapping[str, float | None] = request.extensions.get("timeout", {})
        origin = (url.host, url.port or 80)
        body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        head = _encode(request, body)
        await self._admit(timeouts.get("pool"))
        conn: _Connection | None = None
        try:
            conn = self._take_idle(origin)
            if conn is None:
                conn = await self._connect(origin, timeouts.get("connect"))
            await self._send(conn, head + body, timeouts.get("write"))
            exchange = _Exchange(self, conn, timeouts.get("read"))
            await exchange.read_head()
        except BaseException:
            if conn is None:
                self._in_use -= 1
                self._wake()
            else:
                self._release(conn, False)
            raise
        return httpx.Response(
            exchange.parser.get_status_code(),
            headers=exchange.headers,
            stream=exchange,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": exchange.reason.strip()},
        )

    async def _admit(self, pool_timeout: float | None) -> None:
        """Wait for a free slot among `max_connections` requests in flight."""
        if self._max_in_use is not None:
            while self._in_use >= self._max_in_use:
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    async with asyncio.timeout(pool_timeout):
                        await waiter
                except BaseException as exc:
                    if waiter.done() and not waiter.cancelled():
                        self._wake()
                    else:
                        waiter.cancel()
                    if isinstance(exc, TimeoutError):
                        raise httpx.PoolTimeout("no upstream connection became free in time") from exc
                    raise
        self._in_use += 1

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        stack = self._idle.get(origin)
        if not stack:
            return None
        now = time.monotonic()
        while stack:
            conn = stack.pop()
            self._idle_count -= 1
            if conn.usable(now, self._expiry):
                return conn
            conn.close()
        return None

    async def _connect(self, origin: _Origin, connect_timeout: float | None) -> _Connection:
        host, port = origin
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc!r}") from exc
        self.connections_opened += 1
        return _Connection(origin, reader, writer)

    async def _send(self, conn: _Connection, data: bytes, write_timeout: float | None) -> None:
        writer = conn.writer
        try:
            writer.write(data)
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(write_timeout):
                    await writer.drain()
        except TimeoutError as exc:
            raise httpx.WriteTimeout("timed out sending the request upstream") from exc
        except OSError as exc:
            raise httpx.WriteError(f"sending the request upstream failed: {exc!r}") from exc

    def _release(self, conn: _Connection, reusable: bool) -> None:
        self._in_use -= 1
        if (
            reusable
            and not self._closed
            and self._idle_count < self._max_idle_or_inf()
            and not (conn.writer.is_closing() or conn.reader.at_eof())
        ):
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
            self._idle_count += 1
        else:
            conn.close()
        self._wake()

    def _max_idle_or_inf(self) -> float:
        return float("inf") if self._max_idle is None else self._max_idle

    async def aclose(self) -> None:
        self._closed = True
        idle = [conn for stack in self._idle.values() for conn in stack]
        self._idle.clear()
        self._idle_count = 0
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()
        if self._fallback is not None:
            await self._fallback.aclose()


def lean_client(**kwargs: Any) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` whose `http://` requests go through a `LeanTransport`."""
    limits: httpx.Limits = kwargs.pop("limits", DEFAULT_LIMITS)
    return httpx.AsyncClient(transport=LeanTransport(limits), **kwargs)
