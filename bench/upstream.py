"""The benchmark's upstream: the SDK's `MCPServer` with one `echo` tool, in its own process.

`python -m bench.upstream PORT [json|sdk]` serves it at http://127.0.0.1:PORT/mcp until terminated:

- `json` (the default): `json_response=True, stateless_http=True`, no sessions, every answer one
  JSON body; the cheapest way to run the SDK's server.
- `sdk`: `streamable_http_app()` with the SDK's defaults, as most deployed servers run it:
  `initialize` opens a session (`Mcp-Session-Id`) that the server keeps, and answers to a
  legacy-session client's requests come as an SSE stream. A 2026-07-28 client's stateless
  requests are answered as JSON by the same server.
"""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING, Any

import uvicorn

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer


def echo_server() -> MCPServer:
    # imported here, so `serve` costs the LLM benchmark's provider (`bench.llm_provider`) no MCP SDK
    from mcp.server.mcpserver import MCPServer

    srv = MCPServer("bench-echo", log_level="WARNING")

    @srv.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    return srv


def serve(app: Any, port: int) -> None:
    """Serve `app` on loopback as Bastion is served (uvicorn, httptools, uvloop), start-up objects
    frozen as Bastion freezes its own: without that, a full collection of the SDK's start-up
    objects stalls the process for ~50 ms every few seconds, and whichever scenario it lands in
    gets that p99."""
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        lifespan="on",
        server_header=False,
    )


KINDS = ("json", "sdk")


def app_for(kind: str) -> Any:
    if kind == "json":
        return echo_server().streamable_http_app(
            streamable_http_path="/mcp", json_response=True, stateless_http=True
        )
    if kind == "sdk":
        return echo_server().streamable_http_app(streamable_http_path="/mcp")
    raise ValueError(f"upstream kind {kind!r}: one of {', '.join(KINDS)}")


def main(port: int, kind: str = "json") -> None:
    serve(app_for(kind), port)


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])
