"""Readiness: can this replica govern a call right now? Each check is bounded in time.

Ready means: a policy set is loaded, the audit store answers, and the state database (budgets,
keys) answers. Each check reports "ok" or what is wrong, so `/readyz` tells an operator where
to look. A check that hangs counts as failed after `CHECK_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from audit.store import AuditStoreError

if TYPE_CHECKING:
    from gateway.app import Gateway

CHECK_TIMEOUT_S = 2.0


async def _probe(check: Awaitable[None]) -> str:
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"unavailable: no answer within {CHECK_TIMEOUT_S:g} s"
    except AuditStoreError as exc:
        return f"unavailable: {exc}"
    except (SQLAlchemyError, OSError) as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


async def _ping_state(gw: Gateway) -> None:
    assert gw.state is not None
    async with gw.state.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def readiness(gw: Gateway) -> tuple[bool, dict[str, str]]:
    """(ready, checks): every check's "ok" or the reason it failed."""
    checks: dict[str, str] = {"policy": gw.policy.version if gw.policy else "not loaded"}
    if gw.store is None:
        checks["audit"] = "unavailable: not opened"
    else:
        checks["audit"] = await _probe(gw.store.ping())
    if gw.state is not None:
        checks["state"] = await _probe(_ping_state(gw))
    ok = gw.policy is not None and all(v == "ok" for k, v in checks.items() if k != "policy")
    return ok, checks


def circuits(gw: Gateway) -> dict[str, str]:
    """Each upstream's circuit breaker: closed, open, half-open, or none (no breaker configured).

    Informational: an open circuit does not make the replica unready (every replica would see
    the same upstream down, and pulling them all would turn one failing tool into an outage)."""
    if gw.pipeline is None:
        return {}
    return {name: guard.state or "none" for name, guard in sorted(gw.pipeline.guards.items())}
