"""The A2A benchmark's processes: the agent, and the bare proxy in front of it.

`python -m bench.a2a_agent --port P` runs the tests' echo agent (`tests.a2a_agents.running_agent(
"echo", echo())`: the official a2a-sdk server, JSON-RPC 1.0 with 0.3 compatibility on `/`, its card
at `/.well-known/agent-card.json`; each message is answered with a completed task holding one
artifact, the text echoed and the data parts returned) on http://127.0.0.1:P/ until terminated.
It prints `ready <url>` once it serves (P = 0: any free port, read the URL from that line).

The test agent keeps every request it receives (`Agent.seen`, for the tests' checks); here that
list is emptied every second, so a long run does not grow on it. The SDK's in-memory task store
keeps every task, as a real agent's store would: a few KB per message.

`python -m bench.a2a_agent --port P --forward-to URL` runs the bench's bare forwarding proxy
instead (`bench.passthrough`, the floor of scenario (p) in `python -m bench`: Bastion's HTTP
stack and upstream client, no governance), with `A2A-Version` added to the headers it passes on
(it forwards MCP's only; without the header the SDK takes a `SendMessage` for 0.3 and refuses it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import socket
import sys
import types
from unittest import mock

import uvloop

from bench import passthrough
from tests import a2a_agents
from tests.a2a_agents import echo, running_agent

A2A_VERSION_HEADER = "a2a-version"
SEEN_CLEARED_EVERY_S = 1.0


def _sockets_on(port: int) -> types.SimpleNamespace:
    """A stand-in for the `socket` module as `running_agent` uses it, whose sockets bind to `port`
    where it asks for 0 (it binds a free port itself, and takes no port)."""

    class OnPort(socket.socket):
        def bind(self, address: object) -> None:
            assert isinstance(address, tuple)
            super().bind((address[0], port or address[1]))

    return types.SimpleNamespace(
        socket=OnPort,
        AF_INET=socket.AF_INET,
        SOCK_STREAM=socket.SOCK_STREAM,
        SOL_SOCKET=socket.SOL_SOCKET,
        SO_REUSEADDR=socket.SO_REUSEADDR,
    )


async def serve_agent(port: int) -> None:
    with mock.patch.object(a2a_agents, "socket", _sockets_on(port)):
        context = running_agent("echo", echo())
        agent = await context.__aenter__()
    try:
        # as `bench.upstream.serve` does: start-up objects frozen, so no full collection of the
        # SDK's imports stalls the agent now and then (and lands in one path's p99)
        gc.collect()
        gc.freeze()
        print(f"ready {agent.url}", flush=True)
        while True:
            await asyncio.sleep(SEEN_CLEARED_EVERY_S)
            agent.seen.clear()
    finally:
        await context.__aexit__(*sys.exc_info())


def serve_proxy(port: int, url: str) -> None:
    passthrough._FORWARDED = passthrough._FORWARDED | {A2A_VERSION_HEADER}
    print(f"ready http://127.0.0.1:{port}/ -> {url}", flush=True)
    passthrough.main(port, url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.a2a_agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="loopback port (default 0: any free one)")
    p.add_argument("--forward-to", metavar="URL", help="run the bare proxy to the agent at URL instead")
    args = p.parse_args(argv)
    if args.forward_to:
        if not args.port:
            p.error("--forward-to needs --port")
        serve_proxy(args.port, args.forward_to)
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_agent(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
