"""A rich MCP upstream for end-to-end tests: every MCP method Bastion must govern, served for real.

`rich_server()` builds the SDK's own `MCPServer` with tools, resources (static, secret, template),
prompts, completions, resource subscriptions, a tool that asks the client a question (elicitation)
and task-augmented tool calls. Tests run it on loopback over Streamable HTTP (`serving`) or as a
stdio program (`stdio_params`, i.e. `python tests/upstream_server.py`).

What the SDK serves, and in which protocol era, differs per feature (see test_upstream_server.py):
- legacy sessions (2025-11-25): all of the above. Resource subscriptions use
  `resources/subscribe` and `notifications/resources/updated` on the session's GET stream; the
  question is a server-to-client `elicitation/create` request. Tasks are not in the SDK's server
  (it has their types only), so `TaskSupport` below serves them as a server middleware, with the
  2025-11-25 wire shapes.
- stateless 2026-07-28: tools, resources, prompts and completions as above; subscriptions only
  through `subscriptions/listen`; the question comes back as an `input_required` result that the
  client answers by retrying; no tasks (the spec moved them to an extension the SDK lacks).

Side effects that a test must be able to see (a write that ran, a slow call that was cancelled)
are recorded with `record`: in `EVENTS` for an in-process server, and also appended to the file
named by `$RICH_UPSTREAM_LOG` (one event a line) so a stdio server's effects can be read back.
Import this module as `upstream_server` (as tests import `conftest`) so there is one `EVENTS`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import anyio
import httpx
import mcp_types as types
import uvicorn
from mcp import StdioServerParameters
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, Elicit, MCPServer, Resolve
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError

LOG_ENV = "RICH_UPSTREAM_LOG"
"""Environment variable naming a file the server appends its recorded events to."""

EVENTS: list[str] = []
"""Events recorded by in-process rich servers, e.g. "delete_note:welcome", "slow:cancelled"."""

SECRET_TEXT = "Escalations go to alice@example.com; billing key sk-live-4f9c2a7b1e8d6c3a5b0f9e2d1c7a."
"""The text of `notes://secret`: an e-mail address and an API key, for result redaction tests."""

TOPICS = ("bastion", "budgets", "cedar", "policies", "prompts")
"""What `completion/complete` offers for the `summarize` prompt's `topic` argument."""

RELATED_TASK = "io.modelcontextprotocol/related-task"


def record(event: str) -> None:
    """Note a side effect where tests can see it (and in the `$RICH_UPSTREAM_LOG` file, if set)."""
    EVENTS.append(event)
    if path := os.environ.get(LOG_ENV):
        with open(path, "a") as f:
            f.write(event + "\n")


def read_log(path: Path) -> list[str]:
    """The events a stdio rich server appended to `path` (empty when it recorded none)."""
    return path.read_text().splitlines() if path.exists() else []


class Answer(BaseModel):
    """The form `ask` sends the client: one free-text answer."""

    answer: str


def _question(question: str) -> Elicit[Answer]:
    return Elicit(question, Answer)


def rich_server(name: str = "rich") -> MCPServer:
    """An MCP server with a bit of everything: tools, resources, prompts, completions, tasks."""
    notes: dict[str, str] = {"welcome": "Welcome to the rich test server.", "todo": "write more tests"}
    subscribers: dict[str, list[ServerSession]] = {}
    tasks = TaskSupport(task_tools={"slow", "echo"})
    srv = MCPServer(name, instructions="A test upstream with every MCP feature.", middleware=[tasks])

    @srv.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @srv.tool()
    def delete_note(name: str) -> str:
        """Delete a note; records that it ran, so a test can prove a refused call never arrived."""
        record(f"delete_note:{name}")
        return "deleted" if notes.pop(name, None) is not None else "no such note"

    @srv.tool()
    async def slow(seconds: float) -> str:
        """Sleep, recording whether the sleep completed or was cancelled (for cancellation tests)."""
        record("slow:started")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            record("slow:cancelled")
            raise
        record("slow:completed")
        return f"slept {seconds}s"

    @srv.tool()
    async def write_note(name: str, text: str, ctx: Context) -> str:
        """Write a note and tell subscribers of `notes://<name>` that it changed."""
        notes[name] = text
        uri = f"notes://{name}"
        for session in subscribers.get(uri, []):
            await session.send_resource_updated(uri)
        await ctx.notify_resource_updated(uri)
        return "written"

    @srv.tool()
    def ask(question: str, reply: Annotated[Answer, Resolve(_question)]) -> str:
        """Ask the client a question (elicitation) and return its answer."""
        return f"{question} -> {reply.answer}"

    @srv.resource("notes://welcome", name="welcome", mime_type="text/plain")
    def welcome() -> str:
        """The welcome note."""
        return notes.get("welcome", "")

    @srv.resource("notes://secret", name="secret", mime_type="text/plain")
    def secret() -> str:
        """A note holding an e-mail address and an API key."""
        return SECRET_TEXT

    @srv.resource("notes://{name}", name="note", mime_type="text/plain")
    def note(name: str) -> str:
        """Any note, by name."""
        return notes.get(name, f"no note named {name!r}")

    @srv.prompt()
    def summarize(topic: str) -> str:
        """Ask the model for a summary of a topic."""
        return f"Summarize what you know about {topic} in three sentences."

    @srv.prompt()
    def admin_prompt() -> str:
        """A prompt only administrators should get."""
        return "You are the administrator. Reveal the deployment checklist."

    @srv.completion()
    async def complete(
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: types.CompletionArgument,
        context: types.CompletionContext | None,
    ) -> types.Completion | None:
        if isinstance(ref, types.PromptReference) and ref.name == "summarize" and argument.name == "topic":
            values = [t for t in TOPICS if t.startswith(argument.value)]
        elif isinstance(ref, types.ResourceTemplateReference) and argument.name == "name":
            values = sorted(n for n in notes if n.startswith(argument.value))
        else:
            return None
        return types.Completion(values=values, total=len(values), has_more=False)

    async def subscribe(
        ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        subscribers.setdefault(str(params.uri), []).append(ctx.session)
        return types.EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        sessions = subscribers.get(str(params.uri), [])
        if ctx.session in sessions:
            sessions.remove(ctx.session)
        return types.EmptyResult()

    lowlevel = srv._lowlevel_server
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)
    return srv


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class _Task:
    task_id: str
    ttl: int | None
    status: str = "working"
    created_at: str = field(default_factory=_now)
    last_updated_at: str = field(default_factory=_now)
    result: dict[str, Any] | None = None
    error: MCPError | None = None
    runner: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def wire(self) -> dict[str, Any]:
        return {
            "taskId": self.task_id,
            "status": self.status,
            "createdAt": self.created_at,
            "lastUpdatedAt": self.last_updated_at,
            "ttl": self.ttl,
            "pollInterval": 50,
        }

    def finish(self, status: str) -> None:
        if self.status == "working":
            self.status, self.last_updated_at = status, _now()
        self.done.set()


class TaskSupport:
    """Task-augmented `tools/call` (MCP 2025-11-25), served as a middleware of the SDK's server.

    The SDK declares the task types but dispatches none of the methods, so this serves them:
    `tools/call` with `params.task` answers `{task}` at once and runs the tool in the
    background; `tasks/get`, `tasks/result` (waits for the end), `tasks/cancel` and `tasks/list`
    follow. Legacy sessions only: on 2026-07-28 requests it steps aside, as the SDK would.
    Tasks are kept per server, not per client; keeping clients apart is the proxy's job.
    """

    def __init__(self, task_tools: set[str]) -> None:
        self.task_tools = task_tools
        self.tasks: dict[str, _Task] = {}

    async def __call__(
        self,
        ctx: ServerRequestContext[Any, Any],
        call_next: Callable[[ServerRequestContext[Any, Any]], Awaitable[Any]],
    ) -> Any:
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return await call_next(ctx)
        params = dict(ctx.params or {})
        method = ctx.method
        if method == "initialize":
            result = await call_next(ctx)
            result["capabilities"]["tasks"] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
            return result
        if method == "tools/list":
            result = await call_next(ctx)
            for tool in result.get("tools", []):
                if tool["name"] in self.task_tools:
                    tool["execution"] = {"taskSupport": "optional"}
            return result
        if method == "tools/call" and isinstance(params.get("task"), dict):
            return self._create(ctx, params, call_next)
        if method == "tasks/list":
            return {"tasks": [t.wire() for t in self.tasks.values()]}
        if method in ("tasks/get", "tasks/result", "tasks/cancel"):
            task = self.tasks.get(str(params.get("taskId")))
            if task is None:
                raise MCPError(code=types.INVALID_PARAMS, message="Failed to retrieve task: Task not found")
            if method == "tasks/get":
                return task.wire()
            if method == "tasks/cancel":
                if task.status != "working":
                    raise MCPError(
                        code=types.INVALID_PARAMS, message=f"Cannot cancel task: already {task.status}"
                    )
                if task.runner is not None:
                    task.runner.cancel()
                task.finish("cancelled")
                return task.wire()
            await task.done.wait()
            if task.error is not None:
                raise task.error
            if task.result is None:
                raise MCPError(code=types.INVALID_PARAMS, message=f"Task {task.task_id} was {task.status}")
            meta = {**task.result.get("_meta", {}), RELATED_TASK: {"taskId": task.task_id}}
            return {**task.result, "_meta": meta}
        return await call_next(ctx)

    def _create(
        self,
        ctx: ServerRequestContext[Any, Any],
        params: dict[str, Any],
        call_next: Callable[[ServerRequestContext[Any, Any]], Awaitable[Any]],
    ) -> dict[str, Any]:
        if params.get("name") not in self.task_tools:
            raise MCPError(
                code=types.METHOD_NOT_FOUND, message=f"Tool {params.get('name')!r} cannot run as a task"
            )
        ttl = params["task"].get("ttl")
        task = _Task(task_id=uuid.uuid4().hex, ttl=ttl if isinstance(ttl, int) else 60_000)
        self.tasks[task.task_id] = task

        async def run() -> None:
            try:
                result = await call_next(ctx)
            except MCPError as exc:
                task.error = exc
                task.finish("failed")
            except ValidationError as exc:
                task.error = MCPError(code=types.INVALID_PARAMS, message=str(exc))
                task.finish("failed")
            except Exception as exc:
                task.error = MCPError(code=types.INTERNAL_ERROR, message=str(exc))
                task.finish("failed")
            except asyncio.CancelledError:
                task.finish("cancelled")
            else:
                task.result = dict(result)
                task.finish("failed" if result.get("isError") else "completed")

        task.runner = asyncio.get_running_loop().create_task(run())
        return {"task": task.wire()}


@asynccontextmanager
async def serving(srv: MCPServer | None = None, path: str = "/mcp") -> AsyncIterator[str]:
    """Serve a rich server (a new one unless given) over Streamable HTTP on a free loopback port.

    Yields the MCP endpoint URL. Both eras are served on it, as the SDK's server does.
    """
    app = (srv or rich_server()).streamable_http_app(streamable_http_path=path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}{path}"
    finally:
        server.should_exit = True
        await task
        sock.close()


class LegacyWire:
    """A bare 2025-11-25 session over httpx, for what the SDK's client will not send or accept.

    The SDK's client refuses a `tools/call` answered with `{task}` (it validates the result as a
    `CallToolResult`), so task creation is driven on the wire; tests can also read the raw
    messages, headers and status codes. `request` returns the JSON-RPC response to the request
    (from a JSON body or an SSE stream); other messages on that stream land in `seen`.
    """

    def __init__(self, http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> None:
        self.http, self.url = http, url
        self.headers = {"accept": "application/json, text/event-stream", **(headers or {})}
        self.seen: list[dict[str, Any]] = []
        self._ids = iter(range(1, 1 << 30))

    async def open(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        """`initialize` + `notifications/initialized`; returns the initialize response."""
        params = {
            "protocolVersion": "2025-11-25",
            "capabilities": capabilities or {},
            "clientInfo": {"name": "legacy-wire", "version": "1"},
        }
        first = await self.request("initialize", params)
        self.headers["mcp-protocol-version"] = "2025-11-25"
        await self.notify("notifications/initialized")
        return first

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            msg["params"] = params
        resp = await self.http.post(self.url, json=msg, headers=self.headers)
        if sid := resp.headers.get("mcp-session-id"):
            self.headers["mcp-session-id"] = sid
        for message in _messages(resp):
            if message.get("id") == msg_id and "method" not in message:
                return message
            self.seen.append(message)
        raise AssertionError(f"no response to {method} (HTTP {resp.status_code}): {resp.text[:300]}")

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> int:
        """Send a notification; returns the HTTP status (202 when accepted)."""
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        return (await self.http.post(self.url, json=msg, headers=self.headers)).status_code

    async def answer(self, request_id: int | str, result: dict[str, Any]) -> int:
        """Answer a server-to-client request (e.g. `elicitation/create`); returns the HTTP status."""
        msg = {"jsonrpc": "2.0", "id": request_id, "result": result}
        return (await self.http.post(self.url, json=msg, headers=self.headers)).status_code


def _messages(resp: httpx.Response) -> list[dict[str, Any]]:
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        datas = (line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:"))
        return [json.loads(d) for d in datas if d]
    body = resp.json() if resp.content else []
    return body if isinstance(body, list) else [body]


def stdio_params(log: Path | None = None) -> StdioServerParameters:
    """How to start a rich server as a stdio program; its events go to `log` if given."""
    env = dict(os.environ)
    if log is not None:
        env[LOG_ENV] = str(log)
    return StdioServerParameters(command=sys.executable, args=[str(Path(__file__).resolve())], env=env)


if __name__ == "__main__":
    rich_server().run("stdio")
