"""`LeanTransport` refuses what h11 refuses, before a byte is written: one test per check.

Each refused request goes to a real loopback server that records every byte it receives; the same
request also goes through httpx's own (h11) transport to another, to show what h11 does with it.
Bastion is stricter than h11 on purpose for header values: no control character but HTAB, no
byte above 0x7F (h11 lets control characters other than NUL, CR, LF, VT and FF through, and
obs-text).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest

from gateway.upstreams.transport import LeanTransport, header_name_ok, header_value_ok


class Recorder:
    """A raw HTTP/1.1 server on 127.0.0.1 that keeps every byte it is sent.

    It answers each request head (and the Content-Length body after it) with `200 ok`, so a
    request h11 lets through completes.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.received = b""
        self.url = ""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    self.received += exc.partial
                    return
                self.received += head
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.received += body
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@asynccontextmanager
async def recording() -> AsyncIterator[Recorder]:
    rec = Recorder()
    server = await asyncio.start_server(rec.serve, "127.0.0.1", 0)
    rec.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/mcp"
    try:
        yield rec
    finally:
        server.close()
        await server.wait_closed()


def with_target(request: httpx.Request, path: str) -> httpx.Request:
    """`request` aimed at a path httpx would refuse to put in a URL: what a caller that builds
    requests by hand could still hand a transport."""
    request.url._uri_reference = request.url._uri_reference._replace(path=path)
    return request


def without_host(request: httpx.Request) -> httpx.Request:
    del request.headers["host"]
    return request


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[str], httpx.Request]
    names: str
    """What the refusal must name (the header, or the part of the request line)."""
    h11_refuses: bool


def header(name: bytes, value: bytes) -> Callable[[str], httpx.Request]:
    return lambda url: httpx.Request("POST", url, headers=[(name, value)], content=b"{}")


VALUE_CASES = [
    ("cr", b"tools/list\rx", True),
    ("lf", b"tools/list\nx", True),
    ("crlf", b"tools/list\r\nContent-Length: 0\r\n\r\nPOST /mcp HTTP/1.1", True),
    ("nul", b"tools/list\x00", True),
    ("vt", b"a\x0bb", True),
    ("ff", b"a\x0cb", True),
    ("c0-soh", b"a\x01b", False),
    ("c0-esc", b"a\x1b[31mred", False),
    ("del", b"a\x7fb", False),
    ("non-ascii-utf8", "caf\u00e9".encode(), False),
    ("non-ascii-latin1", b"caf\xe9", False),
    ("leading-space", b" tools/list", True),
    ("trailing-space", b"tools/list ", True),
    ("leading-tab", b"\ttools/list", True),
    ("trailing-tab", b"tools/list\t", True),
]
CASES = [
    *(
        Case(f"value-{id}", header(b"Mcp-Method", value), "'Mcp-Method'", h11)
        for id, value, h11 in VALUE_CASES
    ),
    Case("name-colon", header(b"Mcp-Method: tools/call\r\nX", b"v"), "header name", True),
    Case("name-colon-only", header(b"x:y", b"v"), "header name 'x:y'", True),
    Case("name-space", header(b"x y", b"v"), "header name 'x y'", True),
    Case("name-empty", header(b"", b"v"), "header name ''", True),
    Case("name-cr", header(b"x\r", b"v"), "header name", True),
    Case("name-non-ascii", header(b"x\xe9", b"v"), "header name", True),
    Case("target-space", lambda url: with_target(httpx.Request("GET", url), "/a b"), "request target", True),
    Case("target-cr", lambda url: with_target(httpx.Request("GET", url), "/a\rb"), "request target", True),
    Case(
        "target-crlf",
        lambda url: with_target(httpx.Request("GET", url), "/a HTTP/1.1\r\nX: y"),
        "request target",
        True,
    ),
    Case("target-nul", lambda url: with_target(httpx.Request("GET", url), "/a\x00"), "request target", True),
    Case("method-space", lambda url: httpx.Request("GE T", url), "HTTP method 'GE T'", True),
    Case("method-crlf", lambda url: httpx.Request("GET / HTTP/1.1\r\nX:", url), "HTTP method", True),
    Case("no-host", lambda url: without_host(httpx.Request("GET", url)), "Host", True),
    Case(
        "two-hosts",
        lambda url: httpx.Request("GET", url, headers=[("Host", "127.0.0.1"), ("Host", "evil")]),
        "Host",
        True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_refused_before_a_byte_is_written(case: Case) -> None:
    async with recording() as lean_srv, recording() as h11_srv:
        transport = LeanTransport()
        async with httpx.AsyncClient(transport=transport) as lean:
            with pytest.raises(httpx.LocalProtocolError) as refused:
                await lean.send(case.build(lean_srv.url))
            assert transport.connections_opened == 0
            assert (await lean.get(lean_srv.url)).text == "ok", "the transport still works"
        assert lean_srv.connections == 1, "only the well-formed request after it connected"
        assert lean_srv.received.startswith(b"GET /mcp HTTP/1.1\r\n")
        assert lean_srv.received.count(b"HTTP/1.1") == 1, "nothing of the refused request was written"

        message = str(refused.value)
        assert case.names in message
        assert len(message) < 200
        assert not any(c in message for c in "\r\n\x00"), "the refusal must not echo control characters"

        async with httpx.AsyncClient() as h11:
            try:
                await h11.send(case.build(h11_srv.url))
            except httpx.LocalProtocolError:
                h11_refused = True
            else:
                h11_refused = False
        assert h11_refused == case.h11_refuses
        if h11_refused:
            assert h11_srv.received == b""


async def test_a_well_formed_request_goes_through_byte_for_byte() -> None:
    """Empty values, spaces and tabs inside a value and every visible ASCII byte are sent as given,
    as h11 sends them."""
    visible = bytes(range(0x21, 0x7F))
    headers = [
        (b"X-Empty", b""),
        (b"X-Inside", b"a b\tc"),
        (b"X-Visible", visible),
        (b"Mcp-Method", b"tools/call"),
    ]
    sent: dict[str, bytes] = {}
    async with recording() as srv:
        for which, client in (
            ("lean", httpx.AsyncClient(transport=LeanTransport())),
            ("h11", httpx.AsyncClient()),
        ):
            async with client:
                before = len(srv.received)
                r = await client.send(httpx.Request("POST", srv.url, headers=headers, content=b'{"a":1}'))
                assert r.status_code == 200 and r.text == "ok"
                sent[which] = srv.received[before:]
    for got in sent.values():
        assert got.startswith(b"POST /mcp HTTP/1.1\r\n")
        assert got.endswith(b'\r\n\r\n{"a":1}')
        for name, value in headers:
            assert b"\r\n" + name + b": " + value + b"\r\n" in got


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("tools/call", True),
        ("", True),
        ("a b\tc", True),
        ("file:///notes/a b.txt", True),
        ("tools/list\r\nX: y", False),
        ("a\nb", False),
        ("a\x00", False),
        ("a\x01", False),
        ("a\x7f", False),
        ("caf\u00e9", False),
        ("\u2028", False),
        (" a", False),
        ("a\t", False),
    ],
)
def test_header_value_ok(value: str, ok: bool) -> None:
    assert header_value_ok(value) is ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("Mcp-Method", True),
        ("x!#$%&'*+.^_`|~9", True),
        ("", False),
        ("a b", False),
        ("a:b", False),
        ("\u00e9", False),
    ],
)
def test_header_name_ok(name: str, ok: bool) -> None:
    assert header_name_ok(name) is ok
