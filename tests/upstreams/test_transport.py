"""`LeanTransport` against real loopback HTTP servers: framing, streaming, reuse, faults, limits."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from httpx_sse import EventSource

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamError
from gateway.upstreams.resilience import surely_not_sent
from gateway.upstreams.streamable_http import StreamableHTTPUpstream
from gateway.upstreams.transport import LeanTransport, lean_client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A raw HTTP/1.1 server on 127.0.0.1 that counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, bytes]] = []
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request's body, or None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode().split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length)
        self.requests.append((lines[0], body))
        return body


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    srv = Server(handler)
    server = await asyncio.start_server(srv.serve, "127.0.0.1", 0)
    srv.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/mcp"
    try:
        yield srv
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def client(**kwargs: object) -> AsyncIterator[tuple[httpx.AsyncClient, LeanTransport]]:
    http = lean_client(**kwargs)
    transport = http._transport
    assert isinstance(transport, LeanTransport)
    async with http:
        yield http, transport


def respond(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


async def echo_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
    while (body := await srv.read_request(reader)) is not None:
        writer.write(respond(json.dumps({"echo": body.decode()}).encode()))
        await writer.drain()


async def test_json_and_keep_alive_reuse() -> None:
    async with serving(echo_json) as srv, client() as (http, transport):
        for i in range(5):
            r = await http.post(srv.url, content=f"call {i}".encode())
            assert r.status_code == 200 and r.json() == {"echo": f"call {i}"}
        assert srv.connections == 1 and transport.connections_opened == 1
        assert [line for line, _ in srv.requests] == ["POST /mcp HTTP/1.1"] * 5


async def test_concurrent_calls_share_a_bounded_pool() -> None:
    async with serving(echo_json) as srv, client() as (http, transport):
        replies = await asyncio.gather(*(http.post(srv.url, content=b"x") for _ in range(40)))
        assert all(r.json() == {"echo": "x"} for r in replies)
        first = srv.connections
        await asyncio.gather(*(http.post(srv.url, content=b"y") for _ in range(8)))
        assert srv.connections == first == transport.connections_opened


async def test_chunked_body() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for part in (b"hello ", b"chunked ", b"world"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")

    async with serving(chunked) as srv, client() as (http, transport):
        assert (await http.post(srv.url, content=b"{}")).content == b"hello chunked world"
        assert (await http.post(srv.url, content=b"{}")).content == b"hello chunked world"
        assert transport.connections_opened == 1


async def test_sse_streams_event_by_event() -> None:
    go_on = asyncio.Event()

    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        first = b"event: message\ndata: one\n\n"
        writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        await go_on.wait()
        second = b"data: two\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second))

    async with (
        serving(sse) as srv,
        client() as (http, _),
        http.stream("POST", srv.url, content=b"{}") as response,
    ):
        events = EventSource(response).aiter_sse()
        async with asyncio.timeout(2):
            assert (await anext(events)).data == "one"
        go_on.set()
        assert [e.data async for e in events] == ["two"]


async def test_server_closing_between_requests_is_not_reused_and_nothing_is_resent() -> None:
    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server
    ) -> None:
        await srv.read_request(reader)
        writer.write(respond(b"{}"))
        await writer.drain()

    async with serving(one_per_connection) as srv, client() as (http, transport):
        assert (await http.post(srv.url, content=b"a")).json() == {}
        await asyncio.sleep(0.05)
        assert (await http.post(srv.url, content=b"b")).json() == {}
        assert [body for _, body in srv.requests] == [b"a", b"b"]
        assert transport.connections_opened == srv.connections == 2


async def test_unsolicited_bytes_on_an_idle_connection_are_not_taken_as_a_response() -> None:
    async def late_408(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(respond(b'{"n": %d}' % len(srv.requests)))
            await writer.drain()
            if len(srv.requests) == 1:
                await asyncio.sleep(0.02)
                writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()

    async with serving(late_408) as srv, client() as (http, transport):
        assert (await http.post(srv.url, content=b"a")).json() == {"n": 1}
        await asyncio.sleep(0.05)
        assert (await http.post(srv.url, content=b"b")).json() == {"n": 2}
        assert transport.connections_opened == srv.connections == 2


async def test_connection_close_header_is_honoured() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(respond(b"{}", b"connection: close\r\n"))
            await writer.drain()

    async with serving(closing) as srv, client() as (http, transport):
        await http.post(srv.url, content=b"a")
        await http.post(srv.url, content=b"b")
        assert transport.connections_opened == srv.connections == 2


async def test_server_dropping_a_request_fails_once_and_never_resends() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)

    async with serving(drop) as srv, client() as (http, _):
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.post(srv.url, content=b"pay")
        assert [body for _, body in srv.requests] == [b"pay"]


async def test_incomplete_body_and_early_close_are_not_reused() -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while (body := await srv.read_request(reader)) is not None:
            if body == b"short":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
                await writer.drain()
                return
            writer.write(respond(b"x" * 1_000_000))
            await writer.drain()

    async with serving(short) as srv, client() as (http, transport):
        with pytest.raises(httpx.RemoteProtocolError, match="before the response body ended"):
            await http.post(srv.url, content=b"short")
        async with http.stream("POST", srv.url, content=b"long") as response:
            assert response.status_code == 200
        assert (await http.post(srv.url, content=b"long")).content == b"x" * 1_000_000
        assert transport.connections_opened == srv.connections == 3


async def test_read_timeout_then_fresh_connection() -> None:
    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader) is not None:
            if len(srv.requests) == 1:
                await asyncio.sleep(0.5)
            writer.write(respond(b"{}"))
            await writer.drain()

    async with serving(slow_first) as srv, client(timeout=httpx.Timeout(5, read=0.2)) as (http, transport):
        with pytest.raises(httpx.ReadTimeout):
            await http.post(srv.url, content=b"a")
        assert (await http.post(srv.url, content=b"b")).json() == {}
        assert transport.connections_opened == 2


async def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client() as (http, _):
        with pytest.raises(httpx.ConnectError):
            await http.post(f"http://127.0.0.1:{port}/mcp", content=b"{}")


async def test_malformed_response() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        await srv.read_request(reader)
        writer.write(b"SMTP ready, not HTTP\r\n\r\n")
        await writer.drain()

    async with serving(garbage) as srv, client() as (http, _):
        with pytest.raises(httpx.RemoteProtocolError, match="malformed HTTP response"):
            await http.post(srv.url, content=b"{}")


async def test_pool_limit_and_pool_timeout() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
        while await srv.read_request(reader) is not None:
            await asyncio.sleep(0.3)
            writer.write(respond(b"{}"))
            await writer.drain()

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with serving(slow) as srv, client(limits=limits, timeout=httpx.Timeout(5, pool=0.1)) as (http, _):
        first = asyncio.ensure_future(http.post(srv.url, content=b"a"))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await http.post(srv.url, content=b"b")
        assert (await first).json() == {}
    async with serving(slow) as srv, client(limits=limits) as (http, transport):
        replies = await asyncio.gather(*(http.post(srv.url, content=b"c") for _ in range(3)))
        assert [r.status_code for r in replies] == [200] * 3
        assert transport.connections_opened == srv.connections == 1


async def test_upstream_uses_lean_transport_unless_configured_otherwise() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/mcp"
    lean = StreamableHTTPUpstream("u", UpstreamConfig(url=url))
    plain = StreamableHTTPUpstream("u", UpstreamConfig(url=url, http_client="httpx"))
    try:
        assert isinstance(lean.client._transport, LeanTransport)
        assert not isinstance(plain.client._transport, LeanTransport)
        with pytest.raises(UpstreamError, match="unreachable: ConnectError") as err:
            await lean.send("POST", b"{}")
        assert surely_not_sent(err.value)
    finally:
        await lean.aclose()
        await plain.aclose()


async def test_https_goes_to_the_fallback_transport() -> None:
    seen: list[str] = []

    def tls_side(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text="via fallback")

    async with httpx.AsyncClient(transport=LeanTransport(fallback=httpx.MockTransport(tls_side))) as http:
        assert (await http.get("https://upstream.invalid/mcp")).text == "via fallback"
    assert seen == ["https://upstream.invalid/mcp"]


async def recording(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, srv: Server) -> None:
    """Keeps each request's head (as `requests[i][0]`) and answers `{}`."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    srv.requests.append((head, b""))
    fields = (line.partition(":") for line in head.split("\r\n")[1:])
    await reader.readexactly(next((int(v) for n, _, v in fields if n.lower() == "content-length"), 0))
    writer.write(respond(b"{}"))
    await writer.drain()


@pytest.mark.parametrize("http_client", ["lean", "httpx"])
async def test_credentials_in_the_upstream_url_are_sent(http_client: str) -> None:
    """`url: http://user:password@host/...` authenticates with Basic, on either HTTP client."""
    async with serving(recording) as srv:
        url = srv.url.replace("http://", "http://alice:s3cret@")
        up = StreamableHTTPUpstream("u", UpstreamConfig(url=url, http_client=http_client))  # type: ignore[arg-type]
        try:
            await (await up.send("POST", b"{}")).body()
        finally:
            await up.aclose()
    head = srv.requests[0][0].lower()
    assert "authorization: basic ywxpy2u6cznjcmv0" in head  # base64("alice:s3cret"), lower-cased
    assert "alice" not in head.split("\r\n")[0] and "host: 127.0.0.1:" in head
