"""Approvals, tools, policy and budgets pages (placeholders until the pages are written)."""

from __future__ import annotations

from starlette.requests import Request

from gateway.fronts.console.context import Context
from gateway.fronts.console.html import Page


async def approvals_page(ctx: Context, request: Request) -> Page:
    return Page("Approvals", "<p>none</p>", "/console/approvals")


async def decide(ctx: Context, approval_id: str, form: dict[str, str]) -> Page:
    return Page("Approvals", "<p>none</p>", "/console/approvals")


async def tools_page(ctx: Context, request: Request) -> Page:
    return Page("Tools", "<p>none</p>", "/console/tools")


async def policy_page(ctx: Context, request: Request) -> Page:
    return Page("Policy", "<p>none</p>", "/console/policy")


async def budgets_page(ctx: Context, request: Request) -> Page:
    return Page("Budgets", "<p>none</p>", "/console/budgets")
