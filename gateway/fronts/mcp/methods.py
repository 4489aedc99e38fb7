"""Every MCP method a client may send, classified: the governed path's table (docs/mcp.md).

A message is exactly one of:

- governed: a Cedar action on a target (`Tool`, `Resource`, `Prompt`), decided, forwarded and
  audited by the pipeline like a tool call;
- a listing: forwarded, and its result filtered to what the call action could allow;
- session: protocol housekeeping that reaches no tool, resource or prompt (handshake, ping,
  logging level, unsubscribe, the 2026-07-28 notification stream);
- correlated: only about the sender's own requests (`notifications/cancelled`, answers to server
  requests, `tasks/*`);
- refused, with a JSON-RPC error and an audit record: anything else, unless the operator lists
  it in `mcp.allow_methods`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.call import Action

Kind = Literal["governed", "listing", "session", "cancel", "task", "allowed", "refused"]


@dataclass(frozen=True, slots=True)
class Governed:
    """A method that is a Cedar action on the target its params name."""

    action: Action
    target: str
    """The params key naming the target: `name` (tools, prompts) or `uri` (resources)."""


@dataclass(frozen=True, slots=True)
class Listing:
    """A list method whose result is filtered to what `action` could allow."""

    action: Action
    field: str
    """The result's list: `tools`, `resources`, `resourceTemplates`, `prompts`."""
    key: str
    """What names an item: `name`, `uri`, `uriTemplate`."""


GOVERNED: Mapping[str, Governed] = {
    "tools/call": Governed("call_tool", "name"),
    "resources/read": Governed("read_resource", "uri"),
    "resources/subscribe": Governed("read_resource", "uri"),
    "prompts/get": Governed("get_prompt", "name"),
    # completion/complete is governed as the action of what it completes (see `completion_target`)
}
LISTINGS: Mapping[str, Listing] = {
    "tools/list": Listing("call_tool", "tools", "name"),
    "resources/list": Listing("read_resource", "resources", "uri"),
    "resources/templates/list": Listing("read_resource", "resourceTemplates", "uriTemplate"),
    "prompts/list": Listing("get_prompt", "prompts", "name"),
}
SESSION = frozenset(
    {
        "initialize",
        "ping",
        "server/discover",
        "logging/setLevel",
        "resources/unsubscribe",
        "subscriptions/listen",
        "notifications/initialized",
        "notifications/roots/list_changed",
    }
)
TASKS = frozenset({"tasks/get", "tasks/result", "tasks/cancel", "tasks/list"})
COMPLETION = "completion/complete"


def classify(method: str, allowed: Collection[str] = ()) -> Kind:
    if method in GOVERNED or method == COMPLETION:
        return "governed"
    if method in LISTINGS:
        return "listing"
    if method in SESSION:
        return "session"
    if method == "notifications/cancelled":
        return "cancel"
    if method in TASKS:
        return "task"
    if method in allowed:
        return "allowed"
    return "refused"


def governed_target(method: str, params: Mapping[str, Any]) -> tuple[Action, Any, Any] | None:
    """The action, the raw target name and the raw arguments of a governed message, or None
    when its params do not name a target (the caller gets an invalid-params error)."""
    if method == COMPLETION:
        return completion_target(params)
    rule = GOVERNED[method]
    args = params.get("arguments", {}) if rule.action in ("call_tool", "get_prompt") else {}
    return rule.action, params.get(rule.target), args


def completion_target(params: Mapping[str, Any]) -> tuple[Action, Any, Any] | None:
    """`completion/complete` completes a prompt's argument (`ref/prompt`) or a resource template's
    (`ref/resource`): it is decided as getting that prompt or reading that resource, with the
    argument being completed (and the ones already given) as `context.args`."""
    ref = params.get("ref")
    if not isinstance(ref, Mapping):
        return None
    argument = params.get("argument")
    args: dict[str, Any] = {}
    context = params.get("context")
    if isinstance(context, Mapping) and isinstance(context.get("arguments"), Mapping):
        args.update(context["arguments"])
    if isinstance(argument, Mapping) and isinstance(argument.get("name"), str):
        args[argument["name"]] = argument.get("value", "")
    if ref.get("type") == "ref/prompt":
        return "get_prompt", ref.get("name"), args
    if ref.get("type") == "ref/resource":
        return "read_resource", ref.get("uri"), args
    return None


MAX_TARGET = 1024
_CONTROL = frozenset(chr(c) for c in (*range(0x20), *range(0x7F, 0xA0)))


def valid_target(name: Any) -> str | None:
    """`name` if it can name a tool, resource or prompt; None otherwise. It goes into the audit
    record, into Cedar ids and (toward 2026-07-28 upstreams) into a header: no control characters."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_TARGET or not _CONTROL.isdisjoint(name):
        return None
    return name
