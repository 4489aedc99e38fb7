"""One call's story (placeholder until the page is written)."""

from __future__ import annotations

from gateway.fronts.console.context import Context
from gateway.fronts.console.html import Page, esc


async def call_page(ctx: Context, record_id: str) -> Page:
    text = await ctx.store.get(record_id)
    if text is None:
        return Page("Call", f"<p>No record {esc(record_id[:64])}.</p>", status=404)
    return Page("Call", f"<pre>{esc(text)}</pre>")


async def verify(ctx: Context, record_id: str) -> Page:
    return await call_page(ctx, record_id)
