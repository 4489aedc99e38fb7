"""Real receivers on loopback for the audit sinks, and a gateway that streams to them.

`HttpReceiver` is a webhook / HEC endpoint that can refuse, hang, or keep a batch and then answer
too late (the sender retries: duplicates); `SyslogReceiver` is a TCP (or TLS) server that reads
RFC 5425 octet-counted frames and can cut a connection mid-batch, dropping what it had not read.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from conftest import free_port, make_config, running
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from audit.store import AuditStore
from gateway.identity.devkeys import DevKey


@dataclass
class HttpReceiver:
    token: str | None = None
    fail: int = 0
    """Answer the next `fail` batches 503 (without keeping them)."""
    late: int = 0
    """Keep the next `late` batches, then answer after `late_s` (past the sender's timeout)."""
    late_s: float = 0.0
    hang: bool = False
    """Hold every request open until the sender gives up (a receiver that accepts but never answers)."""
    delay_s: float = 0.0
    """Wait this long before answering any batch (a slow receiver: batches stay in flight)."""
    lines: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    url: str = ""
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    async def endpoint(self, request: Request) -> Response:
        self.in_flight += 1
        try:
            self.headers.append(dict(request.headers))
            if self.token is not None and request.headers.get("authorization") != self.token:
                return JSONResponse({"text": "Invalid token", "code": 4}, 403)
            if self.hang:
                await self.closing.wait()
                return Response(status_code=503)
            if self.fail:
                self.fail -= 1
                return JSONResponse({"text": "Server is busy", "code": 9}, 503)
            body = (await request.body()).decode()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            self.lines.extend(line for line in body.split("\n") if line)
            self.batches.append(request.headers.get("x-bastion-batch", ""))
            if self.late:
                self.late -= 1
                await asyncio.sleep(self.late_s)
            return JSONResponse({"text": "Success", "code": 0})
        finally:
            self.in_flight -= 1

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@asynccontextmanager
async def http_receiver(**options: Any) -> AsyncIterator[HttpReceiver]:
    receiver = HttpReceiver(**options)
    app = Starlette(routes=[Route("/services/collector/event", receiver.endpoint, methods=["POST"])])
    async with running(app) as base:
        receiver.url = f"{base}/services/collector/event"
        try:
            yield receiver
        finally:
            receiver.closing.set()


_SD = re.compile(r'\[bastion@32473 ((?:[A-Za-z]+="(?:[^"\\\]]|\\.)*" ?)+)\]')
_PARAM = re.compile(r'([A-Za-z]+)="((?:[^"\\\]]|\\.)*)"')


def parse_syslog(msg: bytes) -> dict[str, Any]:
    """An RFC 5424 message's header fields, Bastion's structured data and MSG."""
    text = msg.decode()
    head = re.match(r"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ", text)
    assert head, text[:200]
    sd = _SD.match(text, head.end())
    assert sd, text[head.end() : head.end() + 200]
    params = {k: re.sub(r"\\(.)", r"\1", v) for k, v in _PARAM.findall(sd.group(1))}
    return {
        "pri": int(head.group(1)),
        "timestamp": head.group(2),
        "hostname": head.group(3),
        "app": head.group(4),
        "procid": head.group(5),
        "msgid": head.group(6),
        "sd": params,
        "msg": text[sd.end() + 1 :],
    }


@dataclass
class SyslogReceiver:
    cut_after: int = 0
    """Close each of the next connections after reading this many messages (0: never)."""
    cuts: int = 0
    """How many connections to cut that way."""
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut = self.cut_after if self.cuts > 0 else 0
        if cut:
            self.cuts -= 1
        read = 0
        try:
            while True:
                length = await reader.readuntil(b" ")
                assert re.fullmatch(rb"[1-9][0-9]{0,8} ", length), length
                self.messages.append(await reader.readexactly(int(length)))
                read += 1
                if cut and read >= cut:
                    return  # cut: whatever the sender wrote after this is lost with the socket
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    def parsed(self) -> list[dict[str, Any]]:
        return [parse_syslog(m) for m in self.messages]


@asynccontextmanager
async def syslog_receiver(tls: ssl.SSLContext | None = None, **options: Any) -> AsyncIterator[SyslogReceiver]:
    receiver = SyslogReceiver(**options)
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0, ssl=tls)
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.close()


def sink_config(tmp: Path, data_dir: Path, sinks: list[dict[str, Any]], **extra: Any) -> Any:
    """A gateway config in front of the session's demo upstream, with its own audit and state DBs."""
    audit = {"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}", "instance": "sinks-test", "sinks": sinks}
    audit.update(extra.pop("audit", {}))
    return make_config(
        data_dir,
        {"demo": extra.pop("upstream_url")},
        free_port(),
        audit=audit,
        state=extra.pop("state", {"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"}),
        **extra,
    )


async def make_calls(base: str, dev_key: DevKey, n: int, user: str = "sink-user") -> list[int]:
    """`n` HTTP tool calls, one in five denied by policy; the status codes."""
    token = dev_key.mint(user, audience=base, groups=["developers"])
    codes = []
    async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {token}"}) as http:
        for i in range(n):
            if i % 5 == 4:
                body = {"upstream": "demo", "tool": "transfer", "arguments": {"amount": 5000, "to": "x"}}
            else:
                body = {"upstream": "demo", "tool": "echo", "arguments": {"text": f"call {i}"}}
            codes.append((await http.post(f"{base}/v1/tool-calls", json=body)).status_code)
    return codes


async def chain(url: str, instance: str) -> list[tuple[int, str]]:
    """The instance's chained records (seq, stored text) as the store has them."""
    store = await AuditStore.open(url, create=False)
    try:
        return await store.chained_after(instance, 0, 1_000_000)
    finally:
        await store.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the sink")
        await asyncio.sleep(0.05)


def first_seen(seqs: list[int]) -> list[int]:
    """Each seq at its first arrival: at-least-once delivery may repeat, never reorder, these."""
    seen: set[int] = set()
    out = []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
