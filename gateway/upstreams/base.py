"""What the MCP front needs from an upstream client, whatever carries the messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from gateway.config import UpstreamConfig
from gateway.upstreams.streamable_http import Reply, SharedSession


class Upstream(Protocol):
    name: str
    cfg: UpstreamConfig
    server_info: dict[str, Any]
    capabilities: dict[str, Any]
    instructions: str | None
    shared: SharedSession

    async def detect(self) -> str: ...

    def modern_headers(self, method: str, name: str | None = None) -> dict[str, str]: ...

    async def send(
        self,
        http_method: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        long_lived: bool = False,
    ) -> Reply: ...

    async def reopen_shared(self, stale: str | None) -> None: ...

    async def list_tools(self) -> list[dict[str, Any]]: ...

    async def list_prompts(self) -> list[dict[str, Any]]: ...

    async def aclose(self) -> None: ...
