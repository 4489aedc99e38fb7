"""`bastion policy validate|test|replay` and `bastion explain`: policy authoring from the command line.

`validate` and `test` work offline on the files. `explain` builds the gateway from a config the
way `serve` does (issuers, upstream tool discovery, policy, stages) and runs one request through
identity and the decision stages without forwarding it, so its answer is the one a real call
would get.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast, get_args

import yaml

from gateway.call import Action, Decision, Principal, ToolCall
from gateway.config import Config
from gateway.errors import AuthError, ConfigError
from gateway.policy.cases import CaseError, find_schema, run_paths
from gateway.policy.engine import RESOURCE_TYPES, PolicyEngine
from gateway.stages.policy import shadow_kind
from gateway.upstreams.agents import message_schemas

__all__ = ["explain", "register"]

_ERROR_POLICIES = frozenset({"policy-error", "invalid-arguments"})


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    pol = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command", required=True)
    v = pol.add_parser("validate", parents=[common], help="parse and schema-validate every policy")
    v.add_argument("dir", nargs="?", help="policy directory (default: policy.dir of the config)")
    v.add_argument("--schema", help="Cedar schema (default: DIR's schema.cedarschema or the nearest above)")
    v.add_argument(
        "--tools",
        help="YAML/JSON with a `tools:` mapping UPSTREAM/TOOL -> {input_schema}, e.g. a test case file; "
        "types context.args as the upstreams' tools would",
    )
    v.set_defaults(func=cmd_validate)

    r = pol.add_parser(
        "replay", parents=[common], help="what a candidate policy set would have decided on recorded calls"
    )
    r.add_argument("--candidate", required=True, metavar="DIR", help="the candidate policy directory")
    r.add_argument("--since", help="records at or after this ISO 8601 time")
    r.add_argument("--until", help="records before this ISO 8601 time")
    r.add_argument("--user", help="only this user's records (as the audit names them)")
    r.add_argument("--tool", help="only records of this tool (the record's `tool`)")
    r.add_argument("--limit", type=int, help="at most this many records")
    r.add_argument(
        "--tools",
        help="YAML/JSON `tools:` mapping UPSTREAM/TOOL -> {input_schema} typing context.args "
        "(default: typed from the recorded arguments)",
    )
    r.add_argument("-o", "--output", metavar="FILE", help="write the report: FILE.html, or JSON otherwise")
    r.add_argument(
        "--fail-on",
        action="append",
        choices=["newly-allowed", "newly-denied", "changed-obligation", "indeterminate"],
        help="exit 1 when any record is of this kind (repeatable; for CI)",
    )
    r.set_defaults(func=cmd_replay)

    t = pol.add_parser("test", parents=[common], help="run policy test cases (YAML)")
    t.add_argument(
        "cases", nargs="*", help="case files or directories (default: every tests/*.yaml under policy.dir)"
    )
    t.add_argument("-v", "--verbose", action="store_true", help="list every case, not only failures")
    t.set_defaults(func=cmd_test)

    e = sub.add_parser(
        "explain", parents=[common], help="the decision for one request, with reasons, without forwarding"
    )
    e.add_argument("--token", required=True, help="the caller's bearer token (verified as the gateway would)")
    target = e.add_mutually_exclusive_group(required=True)
    target.add_argument("--tool", metavar="UPSTREAM/TOOL")
    target.add_argument("--resource", metavar="UPSTREAM/URI", help="a resource (action read_resource)")
    target.add_argument("--prompt", metavar="UPSTREAM/PROMPT", help="a prompt (action get_prompt)")
    target.add_argument("--agent", metavar="AGENT", help="an A2A agent (action send_message)")
    e.add_argument(
        "--args",
        default="{}",
        metavar="JSON",
        help="tool or prompt arguments as JSON, or @FILE (for --agent: {text, data, files, metadata})",
    )
    e.add_argument("--skill", help="with --agent: the skill the message names (context.skill)")
    e.add_argument(
        "--action",
        choices=sorted(get_args(Action)),
        help="default: call_tool, read_resource or get_prompt, after what is named",
    )
    e.add_argument("--json", action="store_true", help="print the explanation as JSON")
    e.set_defaults(func=cmd_explain)


def _config(arg: str | None) -> Config:
    from gateway.cli import load_or_demo

    return load_or_demo(arg)


# validate ---------------------------------------------------------------------------------------


def _tool_schemas(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--tools {path}: cannot read: {exc}") from exc
    tools = data.get("tools") if isinstance(data, Mapping) else None
    if not isinstance(tools, Mapping):
        raise ConfigError(f"--tools {path}: no `tools:` mapping of UPSTREAM/TOOL -> {{input_schema: ...}}")
    return {
        str(k): (v or {}).get("input_schema") or {} for k, v in tools.items() if isinstance(v, Mapping | None)
    }


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    policy = cfg.policy
    if args.dir:
        directory = Path(args.dir)
        policy = policy.model_copy(
            update={"dir": directory, "schema_file": find_schema(directory), "entities": None}
        )
    if args.schema:
        policy = policy.model_copy(update={"schema_file": Path(args.schema)})
    tools = _tool_schemas(args.tools) if args.tools else {}
    tools |= message_schemas(cfg.agents)  # the agents' messages are typed by the config alone
    try:
        engine = PolicyEngine.load(policy, tools, [b.name for b in cfg.budgets])
    except ConfigError as err:
        print(err.message, file=sys.stderr)
        return 1
    for warning in engine.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: policy set {engine.version} in {policy.dir} ({len(engine.policies)} policies)")
    return 0


# replay -----------------------------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.cli import replay

    tools = _tool_schemas(args.tools) if args.tools else None
    try:
        return replay.cmd_replay(args, _config(args.config), tools)
    except ConfigError as err:
        print(err.message, file=sys.stderr)
        return 1


# test -------------------------------------------------------------------------------------------


def cmd_test(args: argparse.Namespace) -> int:
    paths = [Path(c) for c in args.cases] or [_config(args.config).policy.dir]
    try:
        results, errors = run_paths(paths)
    except CaseError as exc:
        print(exc, file=sys.stderr)
        return 1
    for result in results:
        if not result.ok:
            print(f"FAIL {result.describe()}")
        elif args.verbose:
            print(f"ok   {result.suite}:{result.case.line}: {result.case.name}")
    for error in errors:
        print(f"ERROR {error}")
    failed = sum(not r.ok for r in results)
    files = len({r.suite for r in results})
    print(
        f"{len(results) - failed} passed, {failed} failed, {len(errors)} files with errors "
        f"({len(results)} cases in {files} files)"
    )
    if not results and not errors:
        print(f"no case files found under {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    return 1 if failed or errors else 0


# explain ----------------------------------------------------------------------------------------


def _parse_args(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--args {text}: cannot read: {exc}") from exc
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--args: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError("--args: must be a JSON object")
    return value


def _principal_json(p: Principal) -> dict[str, Any]:
    return {
        "id": p.id,
        "sub": p.sub,
        "issuer": p.issuer,
        "groups": sorted(p.groups),
        "roles": sorted(p.roles),
        "tenant": p.tenant,
        "email": p.email,
        "agent": p.agent,
        "delegation_chain": list(p.delegation_chain),
        "scopes": sorted(p.scopes),
    }


def _policies_json(decision: Decision, engine: PolicyEngine) -> list[dict[str, Any]]:
    by_id = {p.id: p for p in engine.policies}
    out = []
    for r in decision.reasons:
        info = by_id.get(r.policy)
        out.append(
            {
                "id": r.policy,
                "effect": info.effect if info else None,
                "reason": r.reason,
                "obligation": info.obligation if info else None,
                "source": info.source if info else None,
            }
        )
    return out


_KINDS = {"Tool": "tool", "Resource": "resource", "Prompt": "prompt", "Agent": "agent"}


async def explain(
    cfg: Config,
    token: str,
    upstream: str,
    tool: str,
    args: Mapping[str, Any],
    action: str = "call_tool",
    skill: str | None = None,
) -> dict[str, Any]:
    """The full decision for one request, as JSON-able data; nothing is forwarded.

    `tool` names what `action` applies to: a tool, a resource's URI (`read_resource`) or a prompt
    (`get_prompt`); for `send_message`, `upstream` is the agent and `tool` the skill (or
    `message`). `decision` is what the pipeline answers (the stage that decided included);
    `policy` is the policy stage's own verdict with each deciding policy, its source and
    obligation, so an obligation the pipeline cannot honour yet is still visible; `listed` says
    whether the matching listing shows the item to this caller. With `policy.shadow`, `shadow` is
    the shadow set's verdict on the same request (`kind`: how it differs from `policy`, or None).
    """
    from gateway.app import Gateway

    kind = _KINDS[RESOURCE_TYPES[action]]
    targets = cfg.agents if kind == "agent" else cfg.upstreams
    if upstream not in targets:
        known = ", ".join(sorted(targets)) or "none"
        what = "agent" if kind == "agent" else "upstream"
        raise ConfigError(f"--{kind}: no {what} named {upstream!r} in the config (configured: {known})")
    cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"watch": False})})
    gw = Gateway(cfg)
    try:
        await gw.start()
        engine = gw.policy
        assert engine is not None
        out: dict[str, Any] = {
            "request": {"action": action, "upstream": upstream, kind: tool, "arguments": dict(args)},
            **({"skill": skill} if skill is not None else {}),
            "policy_version": engine.version,
            "forwarded": False,
        }
        try:
            principal = await gw.auth.authenticate(f"Bearer {token}")
        except AuthError as exc:
            out["principal"] = None
            out["decision"] = Decision.deny("identity", "unauthenticated", exc.message).to_json()
            out["policy"] = None
            if gw.shadow is not None:
                out["shadow"] = None
            out["errors"] = [f"identity: {exc.message}"]
            return out
        out["principal"] = _principal_json(principal)
        call = ToolCall(
            upstream,
            tool,
            dict(args),
            protocol="http",
            action=cast(Action, action),
            principal=principal,
            dry_run=True,
        )
        call.skill = skill
        settings = gw.settings_for(upstream, tool)
        verdict = engine.decide(principal, action, upstream, tool, args, settings, skill=skill)
        final = await gw.mcp.pipeline.decide(call)
        out["decision"] = final.to_json()
        out["policy"] = {
            "effect": verdict.effect,
            "policies": _policies_json(verdict, engine),
            "obligations": sorted(
                {
                    p.obligation
                    for p in engine.policies
                    if p.obligation and p.id in verdict.policy_ids and verdict.effect != "deny"
                }
            ),
        }
        if gw.shadow is not None:
            seen = gw.shadow.decide(principal, action, upstream, tool, args, settings, skill=skill)
            out["shadow"] = {
                "effect": seen.effect,
                "policies": _policies_json(seen, gw.shadow),
                "policy_version": gw.shadow.version,
                "kind": shadow_kind(verdict.effect, seen.effect),
            }
        out["errors"] = [f"{r.policy}: {r.reason}" for r in final.reasons if r.policy in _ERROR_POLICIES]
        if kind == "agent":
            return out  # nothing lists agents
        listing = {"tool": "call_tool", "resource": "read_resource", "prompt": "get_prompt"}[kind]
        settings_for = (lambda name: gw.settings_for(upstream, name)) if kind == "tool" else None
        out["listed"] = bool(engine.listable(principal, listing, upstream, [tool], settings_for))
        return out
    finally:
        await gw.stop()


def render(result: Mapping[str, Any]) -> str:
    """The explanation for a person: effect first, then why."""
    req = result["request"]
    decision = result["decision"]
    name = next(req[k] for k in ("tool", "resource", "prompt", "agent") if k in req)
    lines = [
        f"request:   {req['action']} {req['upstream']}/{name} {json.dumps(req['arguments'])}",
    ]
    p = result.get("principal")
    if p:
        named = "" if p["id"] == p["sub"] else f" (sub {json.dumps(p['sub'])} of {p['issuer']})"
        lines.append(
            f"principal: User::{json.dumps(p['id'])}{named} groups={p['groups']} roles={p['roles']} "
            f"tenant={p['tenant']} agent={p['agent']} chain={p['delegation_chain']} scopes={p['scopes']}"
        )
    lines.append(f"decision:  {decision['effect'].upper()} (decided by stage: {decision['stage']})")
    for r in decision["reasons"]:
        lines.append(f"  - {r['policy']}: {r['reason']}")
    policy = result.get("policy")
    if policy is not None:
        lines.append(f"policy:    {policy['effect']} (policy set {result['policy_version']})")
        for item in policy["policies"]:
            where = f"  [{item['source']}]" if item["source"] else ""
            kind = f"{item['effect']} " if item["effect"] else ""
            note = f" @obligation({item['obligation']})" if item["obligation"] else ""
            lines.append(f"  - {kind}{item['id']}{note}: {item['reason'] or '(no @reason)'}{where}")
        lines.append(f"obligations: {', '.join(policy['obligations']) or 'none'}")
    shadow = result.get("shadow")
    if shadow is not None:
        differs = f", disagrees: {shadow['kind']}" if shadow.get("kind") else ", agrees"
        lines.append(
            f"shadow:    {shadow['effect']} (shadow set {shadow['policy_version']}, never enforced{differs})"
        )
        for item in shadow["policies"]:
            where = f"  [{item['source']}]" if item["source"] else ""
            kind = f"{item['effect']} " if item["effect"] else ""
            lines.append(f"  - {kind}{item['id']}: {item['reason'] or '(no @reason)'}{where}")
    lines.append(f"errors:    {'; '.join(result['errors']) or 'none'}")
    if "listed" in result:
        lines.append(
            f"listed:    {'yes' if result['listed'] else 'no'} (whether a listing shows it to this caller)"
        )
    lines.append("not forwarded (explain never calls the upstream)")
    return "\n".join(lines)


def cmd_explain(args: argparse.Namespace) -> int:
    kind = next(k for k in ("tool", "resource", "prompt", "agent") if getattr(args, k) is not None)
    value: str = getattr(args, kind)
    if kind == "agent":  # an agent is a resource of its own: the skill (or "message") names the call
        value = f"{value}/{args.skill or 'message'}"
    elif args.skill is not None:
        raise ConfigError("--skill goes with --agent")
    upstream, sep, name = value.partition("/")
    shape = {"tool": "UPSTREAM/TOOL", "resource": "UPSTREAM/URI", "prompt": "UPSTREAM/PROMPT"}[kind]
    if not sep or not upstream or not name:
        raise ConfigError(f"--{kind}: expected {shape}, got {value!r}")
    defaults = {
        "tool": "call_tool",
        "resource": "read_resource",
        "prompt": "get_prompt",
        "agent": "send_message",
    }
    action = args.action or defaults[kind]
    if _KINDS[RESOURCE_TYPES[action]] != kind:
        raise ConfigError(f"--action {action} does not apply to --{kind}")
    arguments = _parse_args(args.args)
    cfg = _config(args.config)
    result = asyncio.run(explain(cfg, args.token, upstream, name, arguments, action, args.skill))
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
