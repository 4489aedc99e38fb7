"""`bastion demo`: a gateway in front of a built-in demo MCP server, ready to try.

The demo upstream is a real MCP server (the SDK's `MCPServer`) on an ephemeral loopback port,
with tools, a resource and a prompt; Bastion fronts it as upstream `demo` with the example
policies shipped in this package (`gateway/demo/policies`). The only thing that depends on the
working directory is the data dir `.bastion/` created there: SQLite audit and state, and the dev
signing key.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

from gateway import config as config_mod
from gateway.app import Gateway, bind, build_app, hold_stop_signals, server_for
from gateway.config import Config
from gateway.identity.devkeys import DEV_ISSUER, ensure_dev_key

POLICIES = Path(__file__).parent / "policies"
"""The demo's policy set, schema and cases: package data, so `bastion demo` works from any directory."""


def demo_server() -> MCPServer:
    """A small MCP server: tools (reads, a write, an 'external' payment, a streaming one), the
    notes as resources and a prompt, so every kind of governed MCP request can be tried."""
    srv = MCPServer("bastion-demo", instructions="Demo tools behind Bastion.")
    notes: dict[str, str] = {"welcome": "Bastion governs every tool call that crosses it."}

    @srv.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @srv.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @srv.tool()
    def read_note(name: str) -> str:
        """Read a note by name."""
        return notes.get(name, f"no note named {name!r}")

    @srv.tool()
    def delete_note(name: str) -> str:
        """Delete a note by name."""
        return "deleted" if notes.pop(name, None) is not None else "no such note"

    @srv.tool()
    def transfer(amount: int, to: str) -> str:
        """Pretend to move money to an account."""
        return f"transferred {amount} to {to}"

    @srv.tool()
    async def countdown(n: int, ctx: Context) -> str:
        """Count down from n, reporting progress on the way (a streamed response)."""
        for i in range(n):
            await ctx.report_progress(i, n, f"{n - i} to go")
            await asyncio.sleep(0.05)
        return "liftoff"

    @srv.resource("notes://welcome", name="welcome", mime_type="text/plain")
    def welcome_note() -> str:
        """The welcome note, as a resource: reading it is governed like a tool call."""
        return notes.get("welcome", "")

    @srv.resource("notes://{name}", name="note", mime_type="text/plain")
    def note(name: str) -> str:
        """Any note by name (a resource template)."""
        return notes.get(name, f"no note named {name!r}")

    @srv.prompt()
    def review_note(name: str) -> str:
        """Ask the model to review a note; the note's text is part of the prompt."""
        text = notes.get(name, f"(no note named {name!r})")
        return f"Review the note {name!r} below and suggest one improvement.\n\n{text}"

    return srv


def demo_config(port: int, upstream_url: str, data_dir: Path, host: str = "127.0.0.1") -> Config:
    """The demo's config: upstream `demo`, the packaged policies, everything else in `data_dir`.

    A relative `data_dir` is taken from the working directory now, once, so that nothing later
    (database URLs, key files) depends on where the process happens to be.
    """
    data_dir = Path.cwd() / data_dir
    data: dict[str, Any] = {
        "listen": {"host": host, "port": port},
        "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data_dir / "dev-jwks.json")}]},
        "policy": {"dir": str(POLICIES)},
        "upstreams": {
            "demo": {
                "url": upstream_url,
                "tools": {"delete_note": {"risk": "write"}, "transfer": {"risk": "external"}},
            }
        },
        "audit": {"url": f"sqlite+aiosqlite:///{data_dir / 'audit.db'}"},
        "state": {"url": f"sqlite+aiosqlite:///{data_dir / 'state.db'}"},
        "data_dir": str(data_dir),
    }
    return config_mod.parse(data, Path.cwd())


def banner(cfg: Config, token: str) -> str:
    """What `bastion demo` prints: where to connect, a ready token and calls to paste."""
    url = f"{cfg.listen.base_url}/mcp/demo"
    body = (
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hello"},'
        '"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",'
        '"io.modelcontextprotocol/clientCapabilities":{}}}}'
    )
    curl = " \\\n    ".join(
        [
            f"curl -s {url}",
            '-H "Authorization: Bearer $BASTION_TOKEN"',
            "-H 'Content-Type: application/json' -H 'Accept: application/json, text/event-stream'",
            "-H 'MCP-Protocol-Version: 2026-07-28' -H 'Mcp-Method: tools/call' -H 'Mcp-Name: echo'",
            f"-d {shlex.quote(body)}",
        ]
    )
    return (
        "\nBastion demo is running.\n\n"
        f"  MCP URL (point your MCP client here):  {url}\n"
        f"  Dev token (user 'dev', group 'developers'; valid 24 h):\n\n{token}\n\n"
        "  Call a tool through the gateway:\n\n"
        f"export BASTION_TOKEN={token}\n{curl}\n\n"
        "  Try a denied call too: tool 'delete_note' (admins only) or 'transfer' with amount > 1000.\n"
        "  Resources and prompts: 'resources/read' of notes://welcome, 'prompts/get' of review_note\n"
        '  with {"name": "welcome"} (in the call above, change Mcp-Method, Mcp-Name and the params).\n'
        f"  Audit: bastion audit export --config demo --format jsonl   (records in {cfg.data_dir}/audit.db)\n"
    )


async def run_demo(port: int, host: str = "127.0.0.1", data_dir: Path = Path(".bastion")) -> None:
    """Serve the demo upstream and a gateway in front of it until stopped (SIGINT/SIGTERM)."""
    upstream_sock = bind("127.0.0.1", 0)
    upstream_port = upstream_sock.getsockname()[1]
    upstream_app = demo_server().streamable_http_app(streamable_http_path="/mcp")
    upstream = server_for(upstream_app, upstream_sock, lifespan="on")
    upstream_task = asyncio.create_task(upstream.serve(sockets=[upstream_sock]))
    while not upstream.started:
        if upstream_task.done():
            await upstream_task
        await asyncio.sleep(0.02)
    cfg = demo_config(port, f"http://127.0.0.1:{upstream_port}/mcp", data_dir, host)
    key = ensure_dev_key(cfg.data_dir)  # absolute: a relative data dir is taken from the cwd, once
    gw = Gateway(cfg)
    held = hold_stop_signals()
    try:
        await gw.start()
        sock = bind(cfg.listen.host, cfg.listen.port)
        token = key.mint("dev", audience=f"{cfg.listen.base_url}/mcp/demo", groups=["developers"])
        print(banner(cfg, token), flush=True)
        await server_for(build_app(gw), sock, "info").serve(sockets=[sock])
    finally:
        await gw.stop()
        upstream.should_exit = True
        await upstream_task
        for sig, handler in held.items():
            signal.signal(sig, handler)
