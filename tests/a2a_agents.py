"""Real A2A agents on loopback, for end-to-end tests of the gateway in front of them.

Each agent is the official a2a-sdk server (JSON-RPC routes with 0.3 compatibility on the same
endpoint, plus the agent card route) served by uvicorn in the running event loop on a free
127.0.0.1 port. What an agent does with a message is its `Behaviour`: `echo`, `leaky`, `slow`,
`relay`. Every JSON-RPC POST an agent receives is recorded as a `Seen` before the SDK handles it,
so tests can check what the gateway forwarded (method, headers, body) and what it withheld.

`a2a_client` is the SDK's 1.0 client with a bearer token (for talking to the gateway), and
`text_of` reads the artifact text out of whatever shape a test holds (proto or either wire dict).
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import uvicorn
from a2a.client import Client, ClientCallContext, ClientConfig, create_client
from a2a.client.interceptors import AfterArgs, BeforeArgs, ClientCallInterceptor
from a2a.helpers import get_text_parts, new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    Message,
    Part,
    Role,
    SecurityRequirement,
    SecurityScheme,
    SendMessageRequest,
    StringList,
)
from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]
from google.protobuf.message import Message as ProtoMessage  # type: ignore[import-untyped]
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

DELEGATION_HEADER = "x-bastion-delegation"
"""The request header in which the gateway hands a calling agent its delegation token."""

CLIENT_TIMEOUT_S = 30.0
"""Per-request timeout of the clients here: httpx's 5 s default is too tight on a busy CI box."""


@dataclass
class Seen:
    """One request an agent received: what the gateway sent it."""

    method: str
    """The JSON-RPC method as received ("SendMessage", "message/send", ...); "" if unparsable."""
    headers: dict[str, str]
    """The request headers, names lower-cased."""
    body: dict[str, Any]
    """The parsed JSON-RPC request ({} if the body was not a JSON object)."""


Behaviour = Callable[[RequestContext, TaskUpdater, Seen], Awaitable[None]]
"""What an agent does with one message: emits status/artifact updates through the updater and
ends the task. `Seen` is the request that carried the message (for its headers)."""


@dataclass
class Agent:
    """A running agent, as tests see it: where it is, what it serves, what it received."""

    name: str
    url: str
    """The JSON-RPC endpoint, "http://127.0.0.1:<port>/"; the card is at url + CARD_PATH."""
    card: dict[str, Any]
    """The agent card exactly as served (1.0 fields plus the SDK's 0.3 compatibility fields)."""
    seen: list[Seen] = field(default_factory=list)
    """Every JSON-RPC POST received, in arrival order."""

    @property
    def card_url(self) -> str:
        """Where the agent serves its card."""
        return self.url + ".well-known/agent-card.json"


# --- behaviours ---------------------------------------------------------------------------------


def _parts(context: RequestContext) -> list[Part]:
    return list(context.message.parts) if context.message is not None else []


def echo() -> Behaviour:
    """Answer with what was asked: shows what reached the agent after the gateway's rewriting."""

    async def run(context: RequestContext, updater: TaskUpdater, seen: Seen) -> None:
        parts = _parts(context)
        await updater.start_work()
        out = [Part(text="echo: " + " ".join(get_text_parts(parts)))]
        out += [Part(data=p.data) for p in parts if p.HasField("data")]
        await updater.add_artifact(out, name="echo")
        await updater.complete()

    return run


def leaky(text: str) -> Behaviour:
    """Answer with fixed text (PII, an injection): for checks on what the gateway lets out."""

    async def run(context: RequestContext, updater: TaskUpdater, seen: Seen) -> None:
        await updater.start_work()
        await updater.add_artifact([Part(text=text)], name="leaky")
        await updater.complete()

    return run


def slow(n: int, delay_s: float) -> Behaviour:
    """Emit n artifacts "chunk 0".."chunk n-1" delay_s apart: shows whether events are streamed."""

    async def run(context: RequestContext, updater: TaskUpdater, seen: Seen) -> None:
        await updater.start_work()
        for i in range(n):
            if i:
                await asyncio.sleep(delay_s)
            await updater.add_artifact([Part(text=f"chunk {i}")], name="slow")
        await updater.complete()

    return run


def relay(gateway_url: Callable[[], str]) -> Behaviour:
    """Delegate "ask <agent>: <text>" to <agent> through the gateway, with the gateway's token.

    The answer (artifact "relay") is the onward task's text, or "refused: <reason>" when the
    gateway refused the onward call or gave this agent no delegation token. `gateway_url` is
    called per message, as the gateway usually starts after its agents.
    """

    async def run(context: RequestContext, updater: TaskUpdater, seen: Seen) -> None:
        await updater.start_work()
        answer = await _relay(" ".join(get_text_parts(_parts(context))), seen, gateway_url())
        await updater.add_artifact([Part(text=answer)], name="relay")
        await updater.complete()

    return run


async def _relay(text: str, seen: Seen, gateway: str) -> str:
    token = seen.headers.get(DELEGATION_HEADER)
    if not token:
        return "refused: no delegation token"
    asked = re.fullmatch(r"\s*ask\s+([^\s:]+)\s*:\s*(.*)", text, re.DOTALL)
    if asked is None:
        return "error: expected 'ask <agent>: <text>'"
    target, rest = asked[1], asked[2]
    request = SendMessageRequest(
        message=Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=[Part(text=rest)])
    )
    headers = {"authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(headers=headers, timeout=CLIENT_TIMEOUT_S) as http:
            config = ClientConfig(httpx_client=http, streaming=False)
            client = await create_client(f"{gateway.rstrip('/')}/a2a/{target}", client_config=config)
            async with client:
                texts = [text_of(response) async for response in client.send_message(request)]
    except Exception as exc:
        return f"refused: {_reason(exc)}"
    return "\n".join(t for t in texts if t)


def _reason(exc: BaseException) -> str:
    """The exception's message plus, for an HTTP refusal, the response body.

    The SDK client turns a non-2xx reply into `A2AClientError("HTTP Error 403: ...")` (or
    `AgentCardResolutionError` for the card) whose message omits the body, where a gateway
    puts its reason; the body is on the chained `httpx.HTTPStatusError`.
    """
    reason = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if isinstance(cause, httpx.HTTPStatusError):
        try:
            body = cause.response.text
        except httpx.ResponseNotRead:
            body = ""
        if body:
            reason += f" {body}"
    return reason


# --- the server ---------------------------------------------------------------------------------


class _Executor(AgentExecutor):
    """Runs a behaviour on a task: creates the task first when the message starts a new one."""

    def __init__(self, behaviour: Behaviour) -> None:
        self._behaviour = behaviour

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        if context.current_task is None and context.message is not None:
            await event_queue.enqueue_event(new_task_from_user_message(context.message))
        assert context.task_id is not None and context.context_id is not None
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        seen = context.call_context.state.get("seen")
        await self._behaviour(context, updater, seen if isinstance(seen, Seen) else Seen("", {}, {}))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None
        await TaskUpdater(event_queue, context.task_id, context.context_id or "").cancel()


class _SeenContextBuilder(DefaultServerCallContextBuilder):
    """Hands the recorded `Seen` to the executor through the SDK's per-call state."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        context.state["seen"] = getattr(request.state, "seen", None)
        return context


def _recording(route: BaseRoute, seen: list[Seen]) -> BaseRoute:
    """Wrap the SDK's JSON-RPC route so each POST is recorded before the SDK handles it.

    Starlette caches the body on the `Request`, so the SDK reads it again from there.
    """
    if not isinstance(route, Route):
        return route
    inner = cast(Callable[[Request], Awaitable[Response]], route.endpoint)

    async def endpoint(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        payload: dict[str, Any] = body if isinstance(body, dict) else {}
        method = payload.get("method")
        entry = Seen(
            method=method if isinstance(method, str) else "",
            headers=dict(request.headers),
            body=payload,
        )
        seen.append(entry)
        request.state.seen = entry
        return await inner(request)

    return Route(route.path, endpoint, methods=sorted(route.methods or {"POST"}), name=route.name)


def _card(name: str, url: str, skills: tuple[str, ...]) -> AgentCard:
    """Both wire versions at one URL, streaming, and a bearer scheme for the gateway to rewrite."""
    return AgentCard(
        name=name,
        description=f"test agent {name}",
        version="1.0.0",
        supported_interfaces=[
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0"),
            AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="0.3"),
        ],
        capabilities=AgentCapabilities(streaming=True),
        security_schemes={
            "bearer": SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(scheme="bearer"))
        },
        security_requirements=[SecurityRequirement(schemes={"bearer": StringList()})],
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain", "application/json"],
        skills=[AgentSkill(id=s, name=s, description=f"{s} skill", tags=[s]) for s in skills],
    )


@asynccontextmanager
async def running_agent(
    name: str, behaviour: Behaviour, *, skills: tuple[str, ...] = ("echo",)
) -> AsyncIterator[Agent]:
    """Serve an agent on a free loopback port for the duration of the block; stop it after.

    The socket is bound first so the card can carry the agent's real URL.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    card = _card(name, url, skills)
    agent = Agent(name=name, url=url, card=agent_card_to_dict(card))
    handler = DefaultRequestHandler(_Executor(behaviour), InMemoryTaskStore(), card)
    rpc = create_jsonrpc_routes(handler, "/", context_builder=_SeenContextBuilder(), enable_v0_3_compat=True)
    app = Starlette(routes=[*create_agent_card_routes(card), *(_recording(r, agent.seen) for r in rpc)])
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError(f"agent {name} stopped before it started")
            await asyncio.sleep(0.01)
        yield agent
    finally:
        server.should_exit = True
        await task
        await handler.aclose()
        sock.close()


# --- client side --------------------------------------------------------------------------------


class _Bearer(ClientCallInterceptor):
    """Puts the bearer token (and a test-friendly timeout) on every call the client makes."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def before(self, args: BeforeArgs) -> None:
        context = args.context or ClientCallContext()
        context.service_parameters = {
            **(context.service_parameters or {}),
            "Authorization": f"Bearer {self._token}",
        }
        if context.timeout is None:
            context.timeout = CLIENT_TIMEOUT_S
        args.context = context

    async def after(self, args: AfterArgs) -> None:
        return None


async def a2a_client(url: str, token: str, *, streaming: bool) -> Client:
    """The SDK's 1.0 client for the agent (or gateway route) at `url`, authenticated as `token`.

    The card is fetched from `url` + "/.well-known/agent-card.json" with the same bearer. The
    client owns its HTTP connection: close it (`async with client:` or `await client.close()`).
    """
    return await create_client(
        url,
        client_config=ClientConfig(streaming=streaming),
        interceptors=[_Bearer(token)],
        resolver_http_kwargs={"headers": {"authorization": f"Bearer {token}"}, "timeout": CLIENT_TIMEOUT_S},
    )


def text_of(obj: ProtoMessage | Mapping[str, Any]) -> str:
    """The text of all artifacts' text parts, one per line, from any shape a test holds.

    Takes a proto (`Task`, `Message`, `StreamResponse`, artifact update) or a dict in either wire
    version: a JSON-RPC response, a 1.0 result (`{"task": ...}`), a 0.3 result, a task, an
    artifact-update event. A message with no artifacts gives the text of its own parts.
    """
    data: Any = MessageToDict(obj) if isinstance(obj, ProtoMessage) else obj
    if isinstance(data, Mapping) and isinstance(data.get("result"), Mapping):
        data = data["result"]
    for key in ("task", "message", "artifactUpdate"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping):
        return ""
    parts: list[Any] = []
    if isinstance(data.get("artifacts"), list):
        for artifact in data["artifacts"]:
            parts += artifact.get("parts", []) if isinstance(artifact, Mapping) else []
    elif isinstance(data.get("artifact"), Mapping):
        parts = list(data["artifact"].get("parts", []))
    elif isinstance(data.get("parts"), list):
        parts = data["parts"]
    return "\n".join(
        p["text"]
        for p in parts
        if isinstance(p, Mapping) and isinstance(p.get("text"), str) and p.get("kind", "text") == "text"
    )
