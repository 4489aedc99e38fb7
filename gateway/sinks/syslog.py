"""Syslog over TCP or TLS: RFC 5424 messages with octet-counting framing (RFC 6587 / RFC 5425).

Syslog has no acknowledgement, so a batch counts as delivered only when the receiver's TCP stack
has acknowledged every byte of it (the socket's unacknowledged-bytes count, `TIOCOUTQ`, is 0) and
the connection then stayed open for `settle_s`: a receiver that closes or dies with part of a
batch unread resets the connection (Linux answers such a close with RST), and the batch is sent
again on a new connection. A receiver that read a batch and lost it before storing it cannot be
told apart from one that stored it: plain syslog has no way to say so (the HTTP sink confirms each
batch with its answer). UDP is refused by the config: it loses records without telling anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import re
import ssl
import struct
import termios
import time
from urllib.parse import urlsplit

from gateway.config import SyslogSinkConfig
from gateway.errors import SinkError
from gateway.sinks.events import Event

APP_NAME = "bastion"
MSG_ID = "audit"
SD_ID = "bastion@32473"
"""Structured-data id: 32473 is the enterprise number RFC 5612 reserves for examples and
documentation, as no number is registered for Bastion."""
_NOT_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")
_POLL_S = 0.002


def _header_token(value: str, limit: int) -> str:
    """A HOSTNAME-style field: printable US-ASCII without spaces, or `-` (the nil value)."""
    token = _NOT_PRINTUSASCII.sub("_", value)[:limit]
    return token or "-"


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def message(event: Event, facility: int) -> bytes:
    """One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG`, the chain
    position in the structured data, the record in the sink's format as MSG."""
    pri = facility * 8 + event.severity
    sd = (
        f'[{SD_ID} instance="{_sd_value(event.instance)}" seq="{event.seq}" '
        f'id="{_sd_value(event.record_id)}" hash="{_sd_value(event.hash)}" '
        f'prevHash="{_sd_value(event.prev_hash or "")}"]'
    )
    host = _header_token(event.instance, 255)
    return f"<{pri}>1 {event.ts} {host} {APP_NAME} - {MSG_ID} {sd} {event.line}".encode()


def frame(msg: bytes) -> bytes:
    """Octet counting: the message's length in bytes, a space, the message."""
    return b"%d %s" % (len(msg), msg)


def unsent_bytes(sock: object) -> int:
    """Bytes written to the socket that its peer has not acknowledged yet (Linux `TIOCOUTQ`)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # type: ignore[attr-defined]
    return int(struct.unpack("i", buf)[0])


class SyslogTarget:
    def __init__(self, cfg: SyslogSinkConfig) -> None:
        self.cfg = cfg
        parts = urlsplit(cfg.address)
        self.host = parts.hostname or ""
        self.port = int(parts.port or 0)
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme.lower() == "tls":
            self._ssl = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            if cfg.cert_file and cfg.key_file:
                self._ssl.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None

    def describe(self) -> str:
        return self.cfg.address

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None and self._reader is not None and not self._reader.at_eof():
            return self._writer
        await self._drop()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._ssl), self.cfg.timeout_s
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise SinkError(f"connect {self.cfg.address}: {type(exc).__name__}: {exc}"[:300]) from exc
        # drain() returns once the buffer is empty (with 0, the TLS transport counts an empty buffer
        # as full and stalls every other drain).
        writer.transport.set_write_buffer_limits(high=1, low=0)
        self._reader, self._writer = reader, writer
        return writer

    async def send(self, events: list[Event]) -> None:
        writer = await self._connect()
        data = b"".join(frame(message(e, self.cfg.facility)) for e in events)
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            writer.write(data)
            await asyncio.wait_for(writer.drain(), self.cfg.timeout_s)
            sock = writer.get_extra_info("socket")
            while unsent_bytes(sock) > 0 or writer.transport.get_write_buffer_size() > 0:
                self._check_open(writer)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not acknowledged within {self.cfg.timeout_s:g} s")
                await asyncio.sleep(_POLL_S)
            # Acknowledged by the receiver's kernel, not yet read by the program: one that closes
            # (or dies) with the batch unread resets the connection, seen here within settle_s.
            await asyncio.sleep(self.cfg.settle_s)
            self._check_open(writer)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            await self._drop()
            raise SinkError(f"send to {self.cfg.address}: {type(exc).__name__}: {exc}"[:300]) from exc

    def _check_open(self, writer: asyncio.StreamWriter) -> None:
        reader = self._reader
        if writer.transport.is_closing() or reader is None or reader.at_eof() or reader.exception():
            raise ConnectionResetError("the receiver closed the connection")

    async def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def aclose(self) -> None:
        await self._drop()
