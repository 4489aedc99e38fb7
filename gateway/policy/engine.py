"""The policy engine: every call is decided by Cedar, and nothing else may turn a deny into an allow.

The policy set is read, parsed, schema-validated and indexed once (`PolicyEngine.load`, see
`loader`); a decision only builds the request and evaluates it. Cedar itself is lenient in ways
that would be security bugs here, so this module allows only on a clean `Allow` (no evaluation
errors: Cedar skips a `forbid` whose condition fails), never passes the schema at request time
(it would refuse any undeclared context field), and hands Cedar only sanitised arguments.

The Cedar resource follows from the action: `Tool::"<upstream>/<tool>"` for `call_tool`,
`list_tools`, `approve` and `approve_own`; `Resource::"<upstream>/<uri>"` for `read_resource`;
`Prompt::"<upstream>/<name>"` for `get_prompt`; `Agent::"<agent>"` for `send_message` (an A2A
message, whose `upstream` is the agent). The principal is `User::"<Principal.id>"`: the
subject itself for the first issuer, `<issuer>#<subject>` for the others (docs/identity.md).

Listings (`listable`) show an item when its call action could be allowed for some arguments.
They use Cedar's partial evaluation, which is experimental upstream, so its answer only ever
chooses what to show: every call is still decided by `decide` with the full request.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import cedarpy

from gateway.call import Decision, Effect, Principal, Reason
from gateway.config import PolicyConfig, ToolSettings
from gateway.errors import ConfigError
from gateway.policy.context import ArgumentError, CedarType, cedar_string, sanitize_args
from gateway.policy.listing import (
    UNKNOWN_ARGS,
    UNKNOWN_URI,
    Literals,
    argument_candidates,
    template_pattern,
    uri_candidates,
)
from gateway.policy.loader import (
    OBLIGATIONS,
    REQUEST_ACTIONS,
    PolicyInfo,
    budget_context_type,
    load_set,
    policy_files,
)

__all__ = [
    "LISTING_ACTIONS",
    "OBLIGATIONS",
    "REQUEST_ACTIONS",
    "RESOURCE_TYPES",
    "UNKNOWN",
    "PolicyEngine",
    "PolicyInfo",
    "budget_context_type",
    "policy_files",
]

RESOURCE_TYPES: Mapping[str, str] = {
    "call_tool": "Tool",
    "list_tools": "Tool",
    "approve": "Tool",
    "approve_own": "Tool",
    "read_resource": "Resource",
    "get_prompt": "Prompt",
    "send_message": "Agent",
}
"""The Cedar entity type of the resource, per action."""
LISTING_ACTIONS = frozenset({"call_tool", "read_resource", "get_prompt"})
"""The call actions a listing is derived from (`tools/list`, `resources/list`, `prompts/list`)."""

_STRICTNESS: Mapping[Effect, int] = {"allow": 0, "transform": 1, "approval_required": 2, "deny": 3}
_EVAL_ERROR = re.compile(r"^error while evaluating policy `([^`]*)`: (.*)$", re.S)
_TICKED = re.compile(r"`([^`]*)`")
_CACHE_MAX = 4096
_WITNESS_LIMIT = 512
"""Most full evaluations one listed item may cost when partial evaluation is inconclusive."""
_URI_LIMIT = 16
_DEFAULT_SETTINGS = ToolSettings()
_ACTION_ENTITIES = [
    {"uid": {"type": "Action", "id": a}, "attrs": {}, "parents": []} for a in sorted(REQUEST_ACTIONS)
]
"""Declared so that partial evaluation knows them (an entity it cannot find counts as unknown)."""


def _action_matches(scope: Mapping[str, Any], action: str) -> bool:
    op = scope.get("op")
    if op in ("==", "in") and "entity" in scope:
        return bool(scope["entity"] == {"type": "Action", "id": action})
    if op == "in" and isinstance(scope.get("entities"), list):
        return {"type": "Action", "id": action} in scope["entities"]
    return True


def _resource_matches(scope: Mapping[str, Any], rtype: str, upstream: str, name: str) -> bool:
    """Whether a resource scope can hold for `<rtype>::"<upstream>/<name>"`.

    Exact because Bastion builds the resource entity itself: its only ancestor is
    `Upstream::"<upstream>"`. Anything unrecognised counts as a match (kept, never dropped).
    """
    uid = {"type": rtype, "id": _resource_id(rtype, upstream, name)}
    parent = {"type": "Upstream", "id": upstream} if rtype != "Agent" else uid
    op = scope.get("op")
    if op == "==" and "entity" in scope:
        return bool(scope["entity"] == uid)
    if op == "in" and "entity" in scope:
        return scope["entity"] in (uid, parent)
    if op == "is":
        if scope.get("entity_type") != rtype:
            return False
        inner = scope.get("in")
        return not isinstance(inner, Mapping) or inner.get("entity") in (uid, parent)
    return True


def _uri_condition(uri: str) -> dict[str, Any]:
    attr = {".": {"left": {"Var": "resource"}, "attr": "uri"}}
    return {"kind": "when", "body": {"==": {"left": attr, "right": {"Value": uri}}}}


def _for_template(est: Mapping[str, Any], upstream: str, template: re.Pattern[str]) -> dict[str, Any] | None:
    """A policy as it applies to "some resource of `upstream` matching `template`", or None if it cannot.

    The template is evaluated as one resource whose `uri` is unknown, so a scope naming one
    resource (`resource == Resource::"demo/notes://a"`) would compare ids and never hold: it
    becomes the condition `resource.uri == "notes://a"`, kept only if the template can expand
    to that URI.
    """
    scope = est.get("resource", {})
    op = scope.get("op")
    inner = scope.get("in") if op == "is" else scope
    if op == "is" and scope.get("entity_type") != "Resource":
        return None
    entity = inner.get("entity") if isinstance(inner, Mapping) and op in ("==", "in", "is") else None
    if not isinstance(entity, Mapping):
        return dict(est)
    if entity == {"type": "Upstream", "id": upstream} and op != "==":
        return dict(est)
    ident = entity.get("id")
    prefix = f"{upstream}/"
    if entity.get("type") != "Resource" or not isinstance(ident, str) or not ident.startswith(prefix):
        return None
    uri = ident[len(prefix) :]
    if not template.fullmatch(uri):
        return None
    rewritten = dict(est)
    rewritten["resource"] = {"op": "is", "entity_type": "Resource"}
    rewritten["conditions"] = [_uri_condition(uri), *est.get("conditions", [])]
    return rewritten


def _redact(message: str, policy_text: str) -> str:
    """Cedar quotes values in its errors (`the values `5000` and `1``): keep only policy text."""
    return _TICKED.sub(lambda m: m.group(0) if m.group(1) in policy_text else "`…`", message)


UNKNOWN: Any = object()
"""An argument value a record does not hold (`decide_recorded`): redacted, or only its shape kept."""


def _unknown(name: str) -> dict[str, Any]:
    return {"__extn": {"fn": "unknown", "arg": name}}


def _split_unknown(
    args: Mapping[str, Any], at: tuple[str, ...] = ()
) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """`args` without its unknown leaves, and their paths; a list holding one is unknown whole."""
    known: dict[str, Any] = {}
    paths: list[tuple[str, ...]] = []
    for k, v in args.items():
        if v is UNKNOWN or (isinstance(v, list) and _holds_unknown(v)):
            paths.append((*at, k))
        elif isinstance(v, Mapping):
            inner, more = _split_unknown(v, (*at, k))
            known[k] = inner
            paths += more
        else:
            known[k] = v
    return known, paths


def _holds_unknown(value: Any) -> bool:
    if value is UNKNOWN:
        return True
    if isinstance(value, list):
        return any(_holds_unknown(v) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_unknown(v) for v in value.values())
    return False


def _put(record: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        record = record.setdefault(part, {})
    record[path[-1]] = value


def _unknowns_in(node: Any) -> Iterable[str]:
    """The names of the unknowns a residual policy still depends on."""
    if isinstance(node, dict):
        marks = node.get("unknown")
        if isinstance(marks, list):
            yield from (m["Value"] for m in marks if isinstance(m, dict) and isinstance(m.get("Value"), str))
        for v in node.values():
            yield from _unknowns_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from _unknowns_in(v)


def _resource_id(rtype: str, upstream: str, name: str) -> str:
    """An agent is a resource of its own (`Agent::"<agent>"`); the rest belong to an upstream."""
    return upstream if rtype == "Agent" else f"{upstream}/{name}"


def _uid_text(kind: str, ident: str) -> str:
    return f"{kind}::{cedar_string(ident)}"


def _principal_attrs(principal: Principal) -> dict[str, Any]:
    attrs: dict[str, Any] = {"groups": sorted(principal.groups), "roles": sorted(principal.roles)}
    if principal.tenant is not None:
        attrs["tenant"] = principal.tenant
    if principal.email is not None:
        attrs["email"] = principal.email
    return attrs


def _resource_attrs(rtype: str, upstream: str, name: str, settings: ToolSettings) -> dict[str, Any]:
    if rtype == "Resource":
        return {"uri": name, "upstream": upstream}
    if rtype == "Prompt":
        return {"name": name, "upstream": upstream}
    if rtype == "Agent":
        return {"name": upstream}
    return {"risk": settings.risk, "tags": list(settings.tags)}


class PolicyEngine:
    """A loaded, validated, immutable policy set. Reloading builds a new engine and swaps it in."""

    def __init__(
        self,
        *,
        version: str,
        policies: list[PolicyInfo],
        est: dict[str, Any],
        tz: ZoneInfo,
        arg_types: dict[str, dict[str, CedarType]],
        warnings: Iterable[str] = (),
        base_entities: cedarpy.Entities | None = None,
    ) -> None:
        self.version = version
        self.loaded_at = time.time()
        """When this set was loaded (at start-up or by a hot reload): the console shows it."""
        self.warnings: tuple[str, ...] = tuple(warnings)
        """Problems that do not stop loading but deserve a log line (`file:line:col: message`)."""
        self.policies: tuple[PolicyInfo, ...] = tuple(policies)
        self._by_id = {p.id: p for p in policies}
        self._order = {p.id: i for i, p in enumerate(policies)}
        self._est = est
        self._tz = tz
        self._arg_types = arg_types
        self._base_entities = base_entities
        self.uses_budget = False
        """Whether a policy reads `context.budget` (only then is the budget state looked up)."""
        # Bounded caches, emptied when full: plain dicts stay safe if decisions run in threads.
        self._sets: dict[tuple[str, str, str], tuple[tuple[str, ...], cedarpy.PolicySet]] = {}
        self._sets_by_ids: dict[bytes, cedarpy.PolicySet] = {}
        self._entities: dict[tuple[Any, ...], cedarpy.Entities] = {}
        self._listed: dict[tuple[Any, ...], bool] = {}

    @classmethod
    def load(
        cls,
        cfg: PolicyConfig,
        tool_schemas: Mapping[str, Mapping[str, Any]] = {},
        budget_names: Iterable[str] = (),
        prompt_arguments: Mapping[str, Iterable[str]] = {},
    ) -> PolicyEngine:
        """Read, parse and validate every `*.cedar` under `cfg.dir`; any problem is a ConfigError.

        `tool_schemas` maps `<upstream>/<tool>` to the tool's MCP `inputSchema` and
        `prompt_arguments` maps `<upstream>/<prompt>` to its argument names: together they give
        `context.args` its Cedar type (`ToolArgs`), and the tool schemas the per-tool argument
        types. `budget_names` (the configured budgets) give `context.budget` its type.
        """
        loaded = load_set(cfg, tool_schemas, budget_names, prompt_arguments)
        engine = cls(
            version=loaded.version,
            policies=loaded.policies,
            est=loaded.est,
            tz=loaded.tz,
            arg_types=loaded.arg_types,
            warnings=loaded.warnings,
            base_entities=loaded.base_entities,
        )
        engine.uses_budget = loaded.uses_budget
        try:
            for key in list(tool_schemas)[: _CACHE_MAX // 4]:
                upstream, _, tool = key.partition("/")
                for action in ("call_tool", "list_tools"):
                    engine._subset(action, upstream, tool)
        except ValueError as exc:
            raise ConfigError(f"invalid policy set: Cedar refused the assembled set: {exc}") from exc
        return engine

    # Deciding --------------------------------------------------------------------------------

    def _policy_set(self, action: str, upstream: str, name: str) -> cedarpy.PolicySet:
        """The policies whose scope can match this action and resource, parsed once and cached."""
        return self._subset(action, upstream, name)[1]

    def _subset(self, action: str, upstream: str, name: str) -> tuple[tuple[str, ...], cedarpy.PolicySet]:
        """The ids and parsed set of the policies whose scope can match this action and resource.

        Cedar's cost is linear in the number of policies; most are scoped to other tools and can
        never match, so dropping them changes no decision and no diagnostic.
        """
        key = (action, upstream, name)
        found = self._sets.get(key)
        if found is not None:
            return found
        rtype = RESOURCE_TYPES.get(action, "")
        ests = {
            pid: est
            for pid, est in self._est.items()
            if _action_matches(est.get("action", {}), action)
            and _resource_matches(est.get("resource", {}), rtype, upstream, name)
        }
        found = (tuple(ests), self._parsed(ests))
        if len(self._sets) >= _CACHE_MAX:
            self._sets.clear()
        self._sets[key] = found
        return found

    def _template_subset(self, upstream: str, template: str) -> tuple[tuple[str, ...], cedarpy.PolicySet]:
        """`_subset` for a resource template: policies that can apply to some matching resource."""
        key = ("\x00template", upstream, template)
        found = self._sets.get(key)
        if found is not None:
            return found
        pattern = template_pattern(template)
        ests: dict[str, Any] = {}
        for pid, est in self._est.items():
            if _action_matches(est.get("action", {}), "read_resource"):
                rewritten = _for_template(est, upstream, pattern)
                if rewritten is not None:
                    ests[pid] = rewritten
        found = (tuple(ests), self._parsed(ests))
        if len(self._sets) >= _CACHE_MAX:
            self._sets.clear()
        self._sets[key] = found
        return found

    def _parsed(self, ests: Mapping[str, Any]) -> cedarpy.PolicySet:
        """One parsed handle per distinct subset: many tools share the same few policies."""
        doc = json.dumps({"staticPolicies": dict(ests), "templates": {}, "templateLinks": []}, sort_keys=True)
        digest = hashlib.sha256(doc.encode()).digest()
        found = self._sets_by_ids.get(digest)
        if found is None:
            found = cedarpy.PolicySet.from_json_str(doc)
            if len(self._sets_by_ids) >= _CACHE_MAX:
                self._sets_by_ids.clear()
            self._sets_by_ids[digest] = found
        return found

    def _entities_for(
        self,
        principal: Principal,
        rtype: str,
        upstream: str,
        name: str,
        settings: ToolSettings,
        template: bool = False,
        email_unknown: bool = False,
    ) -> cedarpy.Entities:
        """The principal and the resource as a parsed Cedar handle, cached per (user, resource).

        For a resource template the resource's `uri` is a Cedar unknown (partial evaluation only).
        The actions are declared too, so that partial evaluation can decide `action in [...]`.
        """
        key = (
            principal.id,
            principal.groups,
            principal.roles,
            principal.tenant,
            principal.email,
            rtype,
            upstream,
            name,
            settings.risk if rtype == "Tool" else None,
            tuple(settings.tags) if rtype == "Tool" else None,
            template,
            email_unknown,
        )
        found = self._entities.get(key)
        if found is not None:
            return found
        attrs = _resource_attrs(rtype, upstream, name, settings)
        if template:
            attrs["uri"] = UNKNOWN_URI
        person = _principal_attrs(principal)
        if email_unknown:  # a replayed record holds no address (`decide_recorded`)
            person["email"] = _unknown("principal.email")
        doc = [
            {
                "uid": {"type": "User", "id": principal.id},
                "attrs": person,
                "parents": [{"type": "Group", "id": g} for g in sorted(principal.groups)]
                + [{"type": "Role", "id": r} for r in sorted(principal.roles)],
            },
            {
                "uid": {"type": rtype, "id": _resource_id(rtype, upstream, name)},
                "attrs": attrs,
                "parents": [{"type": "Upstream", "id": upstream}] if rtype != "Agent" else [],
            },
            *_ACTION_ENTITIES,
        ]
        text = json.dumps(doc)
        if self._base_entities is not None:
            found = self._base_entities.with_added_json_str(text)
        else:
            found = cedarpy.Entities.from_json_str(text)
        if len(self._entities) >= _CACHE_MAX:
            self._entities.clear()
        self._entities[key] = found
        return found

    def _local(self, now: datetime | None) -> datetime:
        return (now or datetime.now(self._tz)).astimezone(self._tz)

    def _context(
        self,
        args: Any,
        principal: Principal,
        settings: ToolSettings,
        local: datetime,
        pii: Iterable[str] = (),
        budget: Mapping[str, Any] | None = None,
        session_tainted: bool = False,
        skill: str | None = None,
    ) -> dict[str, Any]:
        chain = list(principal.delegation_chain)
        context: dict[str, Any] = {
            "args": args,
            "agent": {
                "id": principal.agent or "",
                "chain": chain,
                "depth": len(chain),
                "scopes": sorted(principal.scopes),
            },
            "risk": settings.risk,
            "time": {"hour": local.hour, "weekday": local.isoweekday()},
            "pii": sorted(pii),
            "budget": dict(budget or {}),
            "session": {"tainted": session_tainted},
        }
        if skill is not None:
            context["skill"] = skill
        return context

    def decide(
        self,
        principal: Principal,
        action: str,
        upstream: str,
        tool: str,
        args: Mapping[str, Any],
        settings: ToolSettings,
        now: datetime | None = None,
        pii: Iterable[str] = (),
        budget: Mapping[str, Any] | None = None,
        session_tainted: bool = False,
        skill: str | None = None,
    ) -> Decision:
        """Evaluate one request. Anything but a clean Allow is a deny that says why.

        `tool` names the resource of the action: a tool, a resource's URI (`read_resource`) or a
        prompt (`get_prompt`, whose `args` are the prompt's string arguments). `pii`: the entity
        types redaction found in the arguments (`context.pii`); `budget`: per matching budget,
        `{remaining, limit, used}` before this call (`context.budget`)."""
        rtype = RESOURCE_TYPES.get(action)
        if rtype is None:
            return self._deny(Reason("policy-error", f"unknown action {action!r}"))
        key = _resource_id(rtype, upstream, tool)
        try:
            if rtype == "Prompt":
                for name, value in args.items() if isinstance(args, Mapping) else ():
                    if value is not None and not isinstance(value, str):
                        raise ArgumentError(f"argument $[{name!r}]: prompt arguments are strings")
            clean = sanitize_args(args, self._arg_types.get(key) if rtype == "Tool" else None)
        except ArgumentError as exc:
            return self._deny(Reason("invalid-arguments", str(exc)))
        context = self._context(
            clean, principal, settings, self._local(now), pii, budget, session_tainted, skill
        )
        request = {
            "principal": {"type": "User", "id": principal.id},
            "action": {"type": "Action", "id": action},
            "resource": {"type": rtype, "id": key},
            "context": json.dumps(context),
        }
        try:
            result = cedarpy.is_authorized(
                request,
                self._policy_set(action, upstream, tool),
                self._entities_for(principal, rtype, upstream, tool, settings),
            )
        except Exception as exc:  # fail closed on anything the binding raises
            return self._deny(
                Reason("policy-error", f"the request could not be evaluated ({type(exc).__name__})")
            )
        return self._interpret(result, action, key)

    def _interpret(self, result: cedarpy.AuthzResult, action: str, key: str) -> Decision:
        diagnostics = result.diagnostics
        determining = sorted(
            (self._by_id[pid] for pid in diagnostics.reasons if pid in self._by_id),
            key=lambda p: self._order[p.id],
        )
        errors = [self._error_text(e) for e in diagnostics.errors]
        if result.decision == cedarpy.Decision.Allow and not errors:
            effect: Effect = "allow"
            for p in determining:
                obliged = OBLIGATIONS.get(p.obligation or "", "allow")
                if _STRICTNESS[obliged] > _STRICTNESS[effect]:
                    effect = obliged
            ordered = sorted(determining, key=lambda p: OBLIGATIONS.get(p.obligation or "") != effect)
            reasons = tuple(Reason(p.id, p.reason) for p in ordered)
            return Decision(effect, reasons, "policy", self.version)
        forbids = [Reason(p.id, p.reason) for p in determining if p.effect == "forbid"]
        if result.decision == cedarpy.Decision.Deny and forbids:
            extra = (Reason("policy-error", "; ".join(errors)),) if errors else ()
            return Decision("deny", (*forbids, *extra), "policy", self.version)
        if errors or result.decision != cedarpy.Decision.Deny:
            return self._deny(Reason("policy-error", "; ".join(errors) or "Cedar reached no decision"))
        return self._deny(Reason("default-deny", f"no policy permits {action} on {key}"))

    def _error_text(self, error: str) -> str:
        m = _EVAL_ERROR.match(error)
        if m and m.group(1) in self._by_id:
            info = self._by_id[m.group(1)]
            return f"policy {info.id} could not be evaluated: {_redact(m.group(2), info.text)}"
        return f"the request could not be evaluated: {_redact(error, '')}"

    def _deny(self, reason: Reason) -> Decision:
        return Decision("deny", (reason,), "policy", self.version)

    # Listing ---------------------------------------------------------------------------------

    def listable(
        self,
        principal: Principal,
        action: str,
        upstream: str,
        names: Iterable[str],
        settings_for: Callable[[str], ToolSettings] | None = None,
        *,
        now: datetime | None = None,
        session_tainted: bool = False,
    ) -> set[str]:
        """The names a listing shows this caller: those whose call `action` some arguments could allow.

        `action` is the call a listed item leads to: `call_tool` (`tools/list`), `read_resource`
        (`resources/list`, names are URIs) or `get_prompt` (`prompts/list`). Decided with the
        arguments unknown and everything else known (principal, agent, time, session; no PII, no
        budget entries). A tool is also hidden when a forbid denies `list_tools` on it with empty
        arguments. Any failure hides the item. Results are cached per caller, item and hour.
        """
        if action not in LISTING_ACTIONS:
            raise ValueError(f"listable: {action!r} is not one of {sorted(LISTING_ACTIONS)}")
        local = self._local(now)
        shown = set()
        for name in names:
            settings = settings_for(name) if settings_for is not None else _DEFAULT_SETTINGS
            if self._cached_listing(principal, action, upstream, name, settings, local, session_tainted):
                shown.add(name)
        return shown

    def listable_templates(
        self,
        principal: Principal,
        upstream: str,
        templates: Iterable[str],
        *,
        now: datetime | None = None,
        session_tainted: bool = False,
    ) -> set[str]:
        """The URI templates `resources/templates/list` shows this caller.

        A template is shown when `read_resource` could be allowed for some resource of `upstream`
        whose URI the template can expand to (any text in place of each `{...}`), for some
        arguments; decided as one resource whose `uri` is unknown.
        """
        local = self._local(now)
        return {
            t
            for t in templates
            if self._cached_listing(
                principal, "read_resource", upstream, t, _DEFAULT_SETTINGS, local, session_tainted, True
            )
        }

    def _cached_listing(
        self,
        principal: Principal,
        action: str,
        upstream: str,
        name: str,
        settings: ToolSettings,
        local: datetime,
        session_tainted: bool,
        template: bool = False,
    ) -> bool:
        key = (
            principal.id,
            principal.groups,
            principal.roles,
            principal.tenant,
            principal.email,
            principal.agent,
            principal.delegation_chain,
            principal.scopes,
            action,
            upstream,
            name,
            settings.risk,
            tuple(settings.tags),
            local.hour,
            local.isoweekday(),
            session_tainted,
            template,
        )
        found = self._listed.get(key)
        if found is None:
            try:
                found = self._can_list(
                    principal, action, upstream, name, settings, local, session_tainted, template
                )
            except Exception:  # fail closed: an item that cannot be judged is hidden
                found = False
            if len(self._listed) >= _CACHE_MAX:
                self._listed.clear()
            self._listed[key] = found
        return found

    def _can_list(
        self,
        principal: Principal,
        action: str,
        upstream: str,
        name: str,
        settings: ToolSettings,
        local: datetime,
        tainted: bool,
        template: bool,
    ) -> bool:
        listing_ids = self._subset("list_tools", upstream, name)[0] if action == "call_tool" else ()
        if any(self._by_id[pid].effect == "forbid" for pid in listing_ids):
            listing = self.decide(
                principal, "list_tools", upstream, name, {}, settings, local, session_tainted=tainted
            )
            if listing.effect == "deny" and any(r.policy != "default-deny" for r in listing.reasons):
                return False
        rtype = RESOURCE_TYPES[action]
        context = self._context(UNKNOWN_ARGS, principal, settings, local, session_tainted=tainted)
        ids, policies = (
            self._template_subset(upstream, name) if template else self._subset(action, upstream, name)
        )
        request = {
            "principal": _uid_text("User", principal.id),
            "action": _uid_text("Action", action),
            "resource": _uid_text(rtype, f"{upstream}/{name}"),
            "context": context,
        }
        entities = self._entities_for(principal, rtype, upstream, name, settings, template)
        try:
            result = cedarpy.is_authorized_partial(request, policies, entities)
        except Exception:
            result = None
        conclusive = result is not None and not result.diagnostics.errors
        if result is not None and conclusive:
            if result.decision == cedarpy.Decision.Allow:
                return True
            if result.decision == cedarpy.Decision.Deny:
                return False
            conclusive = bool(result.residuals)
        if result is not None and conclusive:
            residuals = [
                result.residuals[p] for p in result.diagnostics.nontrivial_residuals if p in result.residuals
            ]
        else:
            residuals = [self._est[pid] for pid in ids]
        env = {
            "principal": _principal_attrs(principal),
            "context": {k: v for k, v in context.items() if k != "args"},
            "resource": _resource_attrs(rtype, upstream, name, settings),
        }
        literals = Literals().collect([r.get("conditions", []) for r in residuals], env)
        found, complete = self._witness(
            principal, action, upstream, name, settings, local, tainted, literals, template
        )
        if found:
            return True
        unsure = literals.opaque or not complete
        return conclusive and unsure and any(r.get("effect") == "permit" for r in residuals)

    def _witness(
        self,
        principal: Principal,
        action: str,
        upstream: str,
        name: str,
        settings: ToolSettings,
        local: datetime,
        tainted: bool,
        literals: Literals,
        template: bool,
    ) -> tuple[bool, bool]:
        """Whether candidate arguments (and URIs, for a template) exist that a full decision allows,
        and whether the candidates tried were all there are."""
        if action == "get_prompt":
            types: Mapping[str, CedarType] | None = {
                path[1]: "String" for path in literals.values if len(path) > 1 and path[0] == "args"
            }
        elif action == "call_tool":
            types = self._arg_types.get(f"{upstream}/{name}")
        else:
            types = None
        uris = uri_candidates(literals, name, _URI_LIMIT) if template else [name]
        if not uris:
            return False, False
        candidates, complete = argument_candidates(literals, types, max(1, _WITNESS_LIMIT // len(uris)))
        for args, uri in itertools.product(candidates, uris):
            decision = self.decide(
                principal, action, upstream, uri, args, settings, local, session_tainted=tainted
            )
            if decision.effect != "deny":
                return True, complete
        return False, complete and len(uris) < _URI_LIMIT

    # Replay ----------------------------------------------------------------------------------

    def decide_recorded(
        self,
        principal: Principal,
        action: str,
        upstream: str,
        tool: str,
        args: Mapping[str, Any],
        settings: ToolSettings,
        now: datetime,
        pii: Iterable[str] = (),
        budget: Mapping[str, Any] | None = None,
        session_tainted: bool | None = None,
        skill: str | None = None,
        has_email: bool = True,
    ) -> tuple[Decision | None, tuple[str, ...]]:
        """Decide a recorded request where some inputs are not known: the leaves of `args` that
        are `UNKNOWN`, the budget state (None), the session's taint (None) and always the
        principal's e-mail address when it had one (the record never holds it). Cedar evaluates the rest
        (partial evaluation); the answer is the decision when it does not depend on the unknowns,
        else None and the unknowns it depends on. Never a guess."""
        known, unknown = _split_unknown(args)
        if not unknown and budget is not None and session_tainted is not None and not has_email:
            # everything Cedar would see is known: a plain decision (cached entities and sets)
            decided = self.decide(
                principal, action, upstream, tool, args, settings, now, pii, budget, session_tainted, skill
            )
            return decided, ()
        rtype = RESOURCE_TYPES.get(action)
        if rtype is None:
            return self._deny(Reason("policy-error", f"unknown action {action!r}")), ()
        key = _resource_id(rtype, upstream, tool)
        try:
            clean = sanitize_args(known, self._arg_types.get(key) if rtype == "Tool" else None)
        except ArgumentError as exc:
            return self._deny(Reason("invalid-arguments", str(exc))), ()
        for path in unknown:
            _put(clean, path, _unknown("args." + ".".join(path)))
        context = self._context(clean, principal, settings, self._local(now), pii, budget, False, skill)
        if budget is None:
            context["budget"] = _unknown("budget")
        if session_tainted is None:
            context["session"] = {"tainted": _unknown("session.tainted")}
        else:
            context["session"] = {"tainted": session_tainted}
        handle = self._entities_for(principal, rtype, upstream, tool, settings, email_unknown=has_email)
        request = {
            "principal": _uid_text("User", principal.id),
            "action": _uid_text("Action", action),
            "resource": _uid_text(rtype, key),
            "context": context,
        }
        try:
            result = cedarpy.is_authorized_partial(request, self._policy_set(action, upstream, tool), handle)
        except Exception as exc:  # as `decide` does: what cannot be evaluated is an error, a deny
            why = f"the request could not be evaluated ({type(exc).__name__})"
            return self._deny(Reason("policy-error", why)), ()
        pending = [p for p in result.diagnostics.nontrivial_residuals if p in self._by_id]
        obliging = [p for p in pending if self._by_id[p].obligation and self._by_id[p].effect == "permit"]
        if result.decision == cedarpy.Decision.NoDecision or obliging:
            names = sorted({n for p in pending for n in _unknowns_in(result.residuals.get(p))})
            return None, tuple(names) or ("an unknown value",)
        return self._interpret(result, action, key), ()  # type: ignore[arg-type]

    def source_of(self, policy_id: str) -> str | None:
        """Where a policy is written (`file:line:col`), for explaining a decision."""
        info = self._by_id.get(policy_id)
        return info.source if info else None
