"""The benchmark's upstream: the SDK's `MCPServer` with one `echo` tool, in its own process.

`python -m bench.upstream PORT` serves it at http://127.0.0.1:PORT/mcp until terminated.
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


def main(port: int) -> None:
    serve(
        echo_server().streamable_http_app(
            streamable_http_path="/mcp", json_response=True, stateless_http=True
        ),
        port,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]))
