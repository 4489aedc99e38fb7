"""An MCP server that runs as a local program speaking JSON-RPC over stdin/stdout.

Bastion spawns one process per stdio upstream and supervises it: it is started on first use,
initialized once (the legacy handshake, which every stdio server speaks), restarted with
exponential backoff after it dies, and stopped after `idle_timeout_s` without calls. Every
client session of that upstream shares the one process; request ids are rewritten so
concurrent clients never collide.

To the MCP front it looks like a legacy upstream without session ids: it answers with the same
`Reply` objects as the Streamable HTTP client, always as plain JSON. Notifications the server
sends (progress, logs) are not relayed, and server-to-client requests (sampling, elicitation,
roots) are answered with an error, since no single client owns the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import httpx

from gateway.config import UpstreamConfig
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.upstreams.streamable_http import CLIENT_INFO, LEGACY_VERSION, Reply, SharedSession

log = logging.getLogger("bastion.upstream.stdio")

_INHERITED_ENV = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "LC_ALL", "TMPDIR")
MAX_LINE = 16 * 1024 * 1024
BACKOFF_MAX_S = 30.0


def _json_reply(payload: bytes, status: int = 200) -> Reply:
    headers = {"content-type": "application/json"} if payload else {}
    return Reply(httpx.Response(status, headers=headers, content=payload))


class StdioUpstream:
    """Supervises one MCP server process and forwards JSON-RPC messages to it."""

    era = "legacy"

    def __init__(self, name: str, cfg: UpstreamConfig) -> None:
        assert cfg.command is not None
        self.name = name
        self.cfg = cfg
        self.server_info: dict[str, Any] = {"name": name, "version": ""}
        self.capabilities: dict[str, Any] = {}
        self.instructions: str | None = None
        self.shared = SharedSession(id=None)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stderr: asyncio.Task[None] | None = None
        self._idle: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._private_of: dict[str, str] = {}
        """The id a request was sent with -> the private id the process knows it by, while in flight."""
        self._init_result: dict[str, Any] | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._failures = 0
        self._next_start = 0.0
        self._last_use = time.monotonic()
        self.restarts = 0

    # -- the interface the MCP front uses ---------------------------------------------------

    async def detect(self) -> str:
        await self._ensure()
        return self.era

    def modern_headers(self, method: str, name: str | None = None) -> dict[str, str]:
        return {}

    async def reopen_shared(self, stale: str | None) -> None:
        return None

    async def send(
        self,
        http_method: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        long_lived: bool = False,
    ) -> Reply:
        if http_method == "DELETE":
            return _json_reply(b"", 204)
        if http_method != "POST" or body is None:
            return _json_reply(b'{"error":"stdio upstreams offer no server stream"}', 405)
        try:
            msg = json.loads(body)
        except ValueError as exc:
            raise UpstreamError("message for the stdio server is not JSON") from exc
        if not isinstance(msg, dict):
            raise UpstreamError("message for the stdio server is not a JSON-RPC object")
        await self._ensure()
        method = msg.get("method")
        if method == "initialize":
            assert self._init_result is not None
            return _json_reply(
                json.dumps({"jsonrpc": "2.0", "id": msg.get("id"), "result": self._init_result}).encode()
            )
        if "id" not in msg or method is None:
            if method == "notifications/cancelled":
                msg = self._cancellation(msg)
            if msg is not None and method is not None and method != "notifications/initialized":
                await self._write(msg)
            return _json_reply(b"", 202)
        answer = await self._request(msg)
        return _json_reply(json.dumps(answer, separators=(",", ":")).encode())

    def _cancellation(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """A cancellation names the request by the id the front sent; the server knows it by the
        private id it was written with. One for no request in flight here is dropped."""
        params = msg.get("params")
        request_id = params.get("requestId") if isinstance(params, dict) else None
        private = self._private_of.get(str(request_id)) if request_id is not None else None
        if private is None:
            return None
        return {**msg, "params": {**params, "requestId": private}}  # type: ignore[dict-item]

    async def list_tools(self) -> list[dict[str, Any]]:
        return await self._list_all("tools/list", "tools")

    async def list_prompts(self) -> list[dict[str, Any]]:
        return await self._list_all("prompts/list", "prompts")

    async def _list_all(self, method: str, field: str) -> list[dict[str, Any]]:
        await self._ensure()
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(100):
            params = {} if cursor is None else {"cursor": cursor}
            answer = await self._request({"jsonrpc": "2.0", "id": 0, "method": method, "params": params})
            result = answer.get("result") or {}
            items.extend(t for t in result.get(field, []) if isinstance(t, dict))
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return items

    async def aclose(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        await self._stop()

    # -- process supervision ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def _ensure(self) -> None:
        self._last_use = time.monotonic()
        if self.running and self._init_result is not None:
            return
        async with self._lock:
            if self.running and self._init_result is not None:
                return
            wait = self._next_start - time.monotonic()
            if wait > 0:
                raise UpstreamError(f"stdio upstream {self.name} is restarting; retry in {wait:.1f} s")
            try:
                await self._start()
                self._failures = 0
            except (OSError, UpstreamError) as exc:
                self._failures += 1
                self._next_start = time.monotonic() + min(BACKOFF_MAX_S, 0.5 * 2 ** (self._failures - 1))
                await self._stop()
                if isinstance(exc, UpstreamError):
                    raise
                raise UpstreamError(
                    f"stdio upstream {self.name} could not start: {exc.strerror or exc}"
                ) from exc

    async def _start(self) -> None:
        await self._stop()
        env = {k: v for k, v in os.environ.items() if k in _INHERITED_ENV} | self.cfg.env
        cfg = self.cfg
        self._proc = await asyncio.create_subprocess_exec(
            str(cfg.command),
            *cfg.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cfg.cwd,
            limit=MAX_LINE,
        )
        self.restarts += 1
        self._reader = asyncio.create_task(self._read(self._proc))
        self._stderr = asyncio.create_task(self._drain_stderr(self._proc))
        params = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}
        answer = await self._request({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params})
        result = answer.get("result")
        if not isinstance(result, dict):
            raise UpstreamError(f"stdio upstream {self.name} refused initialize")
        await self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self._init_result = result
        self.capabilities = result.get("capabilities") or {}
        self.instructions = result.get("instructions")
        if isinstance(result.get("serverInfo"), dict):
            self.server_info = result["serverInfo"]
        if cfg.idle_timeout_s and (self._idle is None or self._idle.done()):
            self._idle = asyncio.create_task(self._idle_watch(cfg.idle_timeout_s))
        log.info("stdio upstream %s started (pid %s)", self.name, self._proc.pid)

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        self._init_result = None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 3)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in (self._reader, self._stderr):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reader = self._stderr = None
        self._fail_pending(f"stdio upstream {self.name} stopped")

    async def _idle_watch(self, idle_s: float) -> None:
        while True:
            await asyncio.sleep(max(0.05, idle_s / 4))
            if self.running and not self._pending and time.monotonic() - self._last_use > idle_s:
                log.info("stdio upstream %s idle for %.0f s: stopping it", self.name, idle_s)
                async with self._lock:
                    await self._stop()

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(UpstreamError(why))

    # -- framing ----------------------------------------------------------------------------

    async def _write(self, msg: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise UpstreamError(f"stdio upstream {self.name} is not running")
        try:
            proc.stdin.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise UpstreamError(f"stdio upstream {self.name} exited") from exc

    async def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        private = f"b{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[private] = fut
        given = str(msg.get("id"))
        self._private_of[given] = private
        try:
            await self._write({**msg, "id": private})
            answer = await asyncio.wait_for(fut, self.cfg.timeout_s)
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"stdio upstream {self.name} timed out after {self.cfg.timeout_s:g} s"
            ) from exc
        finally:
            self._pending.pop(private, None)
            if self._private_of.get(given) == private:
                del self._private_of[given]
        return {**answer, "id": msg.get("id")}

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("stdio upstream %s wrote a line that is not JSON", self.name)
                    continue
                if not isinstance(msg, dict):
                    continue
                if "method" in msg and "id" in msg:
                    await self._refuse_server_request(msg)
                elif "method" not in msg:
                    fut = self._pending.get(str(msg.get("id")))
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except (ValueError, asyncio.LimitOverrunError):
            log.warning("stdio upstream %s wrote a line over %d bytes", self.name, MAX_LINE)
        finally:
            self._fail_pending(f"stdio upstream {self.name} exited")

    async def _refuse_server_request(self, msg: dict[str, Any]) -> None:
        error = {
            "code": -32601,
            "message": "this client cannot answer server requests through Bastion's stdio bridge",
        }
        with contextlib.suppress(UpstreamError):
            await self._write({"jsonrpc": "2.0", "id": msg["id"], "error": error})

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.debug("stdio upstream %s: %s", self.name, line.decode(errors="replace").rstrip()[:500])
