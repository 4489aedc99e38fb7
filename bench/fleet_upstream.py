"""The fleet soak's upstream: the SDK's `MCPServer` with the SDK's defaults, counting what it runs.

`python -m bench.fleet_upstream PORT` serves http://127.0.0.1:PORT/mcp until terminated, as
`bench.upstream`'s `sdk` kind does (`initialize` opens a session the server keeps, answers to a
session client's requests come as SSE; 2026-07-28 stateless requests are answered as JSON), with
three tools that each return their `text` argument:

- `echo`: the ordinary call;
- `metered`: the tool the soak's budget counts;
- `wire`: the tool a policy holds for a human's approval.

Every execution is counted by `(tool, text)`. The load generator puts a unique key in each
logical call's `text` (a retry sends the same one), so a count above 1 is a call that ran twice.
`GET /executions` answers `{"total": N, "counts": {"tool text": n, ...}}` (only the keys
counted more than once with `?repeats=1`).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bench.upstream import serve

RUNS: Counter[str] = Counter()


def counting_server() -> Any:
    from mcp.server.mcpserver import MCPServer

    srv = MCPServer("fleet-upstream", log_level="WARNING")

    @srv.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        RUNS[f"echo {text}"] += 1
        return text

    @srv.tool()
    def metered(text: str) -> str:
        """Return the text unchanged (a budget counts the calls)."""
        RUNS[f"metered {text}"] += 1
        return text

    @srv.tool()
    def wire(text: str) -> str:
        """Return the text unchanged (a human must approve each call)."""
        RUNS[f"wire {text}"] += 1
        return text

    @srv.custom_route("/executions", methods=["GET"])  # type: ignore[untyped-decorator]
    async def executions(request: Request) -> Response:
        repeats = request.query_params.get("repeats") == "1"
        counts = {k: n for k, n in RUNS.items() if n > 1} if repeats else dict(RUNS)
        return JSONResponse({"total": sum(RUNS.values()), "counts": counts})

    return srv


def main(port: int) -> None:
    serve(counting_server().streamable_http_app(streamable_http_path="/mcp"), port)


if __name__ == "__main__":
    main(int(sys.argv[1]))
