"""Helpers shared by the adapter tests: tokens for the HTTP tool API and audit look-ups."""

from __future__ import annotations

import uuid
from typing import Any

from audit.record import AuditRecord
from gateway.app import Gateway


def api_token(dev_key: Any, base: str, sub: str, groups: tuple[str, ...] = ("developers",)) -> str:
    """A dev token whose audience is the gateway itself, as the HTTP tool API wants."""
    return str(dev_key.mint(sub, audience=base, groups=list(groups)))


def unique(prefix: str) -> str:
    """A subject of its own per test, so its audit records are easy to find."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def records(gw: Gateway, user: str) -> list[AuditRecord]:
    assert gw.store is not None
    return [rec async for rec in gw.store.iter_records(user=user)]


async def record(gw: Gateway, audit_id: str, user: str) -> AuditRecord:
    found = [rec for rec in await records(gw, user) if rec.id == audit_id]
    assert found, f"no audit record {audit_id} for {user}"
    return found[0]
