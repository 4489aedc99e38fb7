"""The benchmark's upstream: the SDK's `MCPServer` with one `echo` tool, in its own process.

`python -m bench.upstream PORT` serves it at http://127.0.0.1:PORT/mcp until terminated.
"""

from __future__ import annotations

import gc
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer


def echo_server() -> MCPServer:
    srv = MCPServer("bench-echo", log_level="WARNING")

    @srv.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    return srv


def main(port: int) -> None:
    app = echo_server().streamable_http_app(
        streamable_http_path="/mcp", json_response=True, stateless_http=True
    )
    # Tuned as Bastion is: without this, a full collection of the SDK's start-up objects stalls
    # the upstream for ~50 ms every few seconds, and whichever scenario it lands in gets that p99.
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


if __name__ == "__main__":
    main(int(sys.argv[1]))
