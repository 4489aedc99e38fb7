"""The console's first page (placeholder until the page is written)."""

from __future__ import annotations

from starlette.requests import Request

from gateway.fronts.console.context import Context
from gateway.fronts.console.html import Page


async def overview_page(ctx: Context, request: Request) -> Page:
    return Page("Overview", "<p>Bastion console.</p>", "/console")
