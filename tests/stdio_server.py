"""A stdio MCP server for the tests: the demo tools plus a few that misbehave on purpose."""

from __future__ import annotations

import os

from gateway.demo import demo_server

srv = demo_server()


@srv.tool()
def pid() -> int:
    """The server's process id, so a test can tell a restarted process from the old one."""
    return os.getpid()


@srv.tool()
def crash() -> str:
    """Exit in the middle of a call, as a buggy server would."""
    os._exit(3)


if __name__ == "__main__":
    srv.run("stdio")
