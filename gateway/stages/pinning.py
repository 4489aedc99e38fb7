"""The pinning stage: a call to a tool whose definition changed (a rug pull) is refused."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.call import Decision, ToolCall
from gateway.state.db import STATE_ERRORS
from gateway.state.pins import ToolPins


class PinningStage:
    """Refuses calls to tools whose current definition is not approved.

    First in the pipeline: a quarantined tool is refused before anything is scanned or charged.
    A tool Bastion has never seen makes it list the upstream's tools once (`recheck`) first. If
    the upstream cannot be listed (it is down), an unseen tool passes in the modes that would
    trust it on first sight anyway (`tofu`, `auto_approve`): the call then fails at the upstream
    like any call to an unreachable server. `enforce` refuses it.
    """

    name = "pinning"

    def __init__(self, pins: ToolPins, recheck: Callable[[str], Awaitable[bool]]) -> None:
        self._pins = pins
        self._recheck = recheck

    async def __call__(self, call: ToolCall) -> Decision | None:
        if call.action != "call_tool":
            return None  # pins are tool definitions; resources and prompts have none
        try:
            pin = await self._pins.get(call.upstream, call.tool)
            if pin is None:
                listed = await self._recheck(call.upstream)
                pin = await self._pins.get(call.upstream, call.tool)
                if pin is None and not listed and self._pins.cfg.mode != "enforce":
                    return None
        except STATE_ERRORS as exc:
            return Decision.deny(
                "pinning", "pins-unavailable", f"tool pins unavailable: {type(exc).__name__}"
            )
        if pin is None:
            return Decision.deny(
                "pinning",
                "tool-not-approved",
                f"tool {call.resource} is not approved: the upstream does not list it",
            )
        if not pin.usable:
            return Decision.deny("pinning", "tool-not-approved", pin.why_not())
        return None
