"""The floor of a Python proxy on Bastion's stack: the benchmark's scenario (p).

`python -m bench.passthrough PORT UPSTREAM_URL` serves /mcp with the same HTTP server (uvicorn
with httptools and uvloop) and the same upstream client (httpx over Bastion's lean keep-alive
transport) as Bastion, and nothing else: no identity, policy, budget or audit. The client's
method, body and MCP headers (including a legacy session's `Mcp-Session-Id`) go to the upstream
as they came, and its answer comes back as it is, with its content type and the session id the
upstream set (a JSON body, or an SSE stream read whole: one answer per request here). What (p)
costs over (a) is what any proxy written this way pays before it governs anything; what (b)
costs over (p) is Bastion's governance.
"""

from __future__ import annotations

import sys
from typing import Any

from bench.upstream import serve
from gateway.upstreams.transport import lean_client

_FORWARDED = frozenset(
    {"content-type", "accept", "mcp-protocol-version", "mcp-method", "mcp-name", "mcp-session-id"}
)
_RETURNED = (b"content-type", b"mcp-session-id")


def app_for(upstream_url: str) -> Any:
    client = lean_client(timeout=30)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        wanted = {k.decode(): v.decode() for k, v in scope["headers"] if k.decode() in _FORWARDED}
        body = b"".join(chunks)
        reply = await client.request(scope["method"], upstream_url, content=body or None, headers=wanted)
        headers = [(k, reply.headers[k.decode()].encode()) for k in _RETURNED if k.decode() in reply.headers]
        await send({"type": "http.response.start", "status": reply.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": reply.content})

    return app


def main(port: int, upstream_url: str) -> None:
    serve(app_for(upstream_url), port)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
