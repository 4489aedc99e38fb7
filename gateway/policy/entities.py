"""The optional entities file: the group and role hierarchy policies can rely on.

Tokens say which groups and roles a user has; the file says how those relate
(`Group::"admins"` in `Group::"developers"`), so `principal in Group::"developers"` also holds for
an admin. It is parsed and schema-checked once per policy load and merged into every request's
entities; only `Group` and `Role` entities may be declared, because users and tools are built
from the token and the config on each request and a second definition would conflict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cedarpy

__all__ = ["ENTITY_TYPES", "load_entities"]

ENTITY_TYPES = frozenset({"Group", "Role"})
"""The entity types the file may declare (and use as parents)."""


def _uid_text(uid: Any) -> str:
    if isinstance(uid, dict):
        return f'{uid.get("type")}::"{uid.get("id")}"'
    return repr(uid)


def _check(doc: Any, path: Path) -> list[str]:
    if not isinstance(doc, list):
        return [f"{path}: expected a JSON array of entities"]
    problems: list[str] = []
    for i, entity in enumerate(doc):
        where = f"{path}: entity [{i}]"
        if not isinstance(entity, dict) or not isinstance(entity.get("uid"), dict):
            problems.append(f"{where}: expected an object with a uid {{type, id}}")
            continue
        uid = entity["uid"]
        if uid.get("type") not in ENTITY_TYPES or not isinstance(uid.get("id"), str):
            problems.append(
                f"{where} {_uid_text(uid)}: only Group and Role entities may be declared "
                "(users come from tokens, tools from the config)"
            )
            continue
        where = f"{where} {_uid_text(uid)}"
        parents = entity.get("parents", [])
        if not isinstance(parents, list):
            problems.append(f"{where}: parents must be an array")
            continue
        for parent in parents:
            if not isinstance(parent, dict) or parent.get("type") != uid["type"]:
                problems.append(
                    f"{where}: parent {_uid_text(parent)} must be a {uid['type']} (groups nest in "
                    "groups, roles in roles)"
                )
        if entity.get("attrs"):
            problems.append(f"{where}: Group and Role entities have no attributes")
    return problems


def load_entities(path: Path, schema: cedarpy.Schema) -> tuple[cedarpy.Entities, bytes]:
    """The parsed hierarchy and the file's bytes (for the policy version), or ValueError saying why.

    Error messages start with the file name (and line:col for JSON syntax errors).
    """
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8") from exc
    problems = _check(doc, path)
    if problems:
        raise ValueError("\n  ".join(problems))
    normalised = [{"uid": e["uid"], "attrs": {}, "parents": e.get("parents", [])} for e in doc]
    try:
        return cedarpy.Entities.from_json_str(json.dumps(normalised), schema), raw
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
