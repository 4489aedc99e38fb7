"""Turning untrusted tool arguments and MCP tool schemas into values Cedar handles safely.

Cedar's JSON format gives meaning to some shapes (`{"__entity": ...}` becomes an entity reference,
`{"__extn": ...}` an extension value) and refuses others (`null`, floats, integers beyond 64 bits),
so raw tool arguments would let an agent forge entities or make the whole request undecidable.
`sanitize_args` maps arguments onto plain Cedar values or refuses them; the pipeline denies a
call whose arguments are refused. `args_type_from_input_schemas` derives the Cedar record type
`ToolArgs` from the tools' input schemas, so policies that read `context.args` are type-checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, TypeAlias

__all__ = [
    "MAX_DEPTH",
    "MAX_LEAVES",
    "ArgumentError",
    "CedarType",
    "arg_types_from_input_schema",
    "args_type_from_input_schemas",
    "cedar_string",
    "merge_arg_types",
    "render_record",
    "sanitize_args",
    "tool_args_record",
]

MAX_DEPTH = 16
"""Most levels of nested objects/arrays below the arguments object."""
MAX_LEAVES = 1000
"""Most values without children (scalars, empty objects/arrays) in one call's arguments."""

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_DEC_MIN = Decimal("-922337203685477.5808")
_DEC_MAX = Decimal("922337203685477.5807")
_RESERVED_KEYS = frozenset({"__entity", "__extn", "__expr"})
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

CedarType: TypeAlias = "str | tuple[str, CedarType] | dict[str, CedarType]"
"""A Cedar type as a small tree: `"Long"`, `"String"`, `"Bool"`, `"decimal"`,
`("Set", element)` or a record `{name: type}` whose attributes are all optional."""


class ArgumentError(Exception):
    """Tool arguments that cannot be handed to Cedar safely; the call is denied, not forwarded."""


def _path_join(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENT.match(key) else f"{path}[{key!r}]"


def _decimal_value(value: Decimal, path: str) -> dict[str, Any]:
    """A Cedar `decimal` (at most 4 fractional digits, 64-bit range) or an ArgumentError."""
    if not value.is_finite():
        raise ArgumentError(f"argument {path}: not a finite number")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -4:
        value = value.normalize()
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -4:
            raise ArgumentError(f"argument {path}: a number with more than 4 decimal places")
    if not _DEC_MIN <= value <= _DEC_MAX:
        raise ArgumentError(f"argument {path}: a number outside Cedar's decimal range")
    text = format(value, "f")
    if "." not in text:
        text += ".0"
    return {"__extn": {"fn": "decimal", "arg": text}}


def _number(value: float, path: str, as_decimal: bool) -> Any:
    if not math.isfinite(value):
        raise ArgumentError(f"argument {path}: not a finite number")
    if value.is_integer() and _I64_MIN <= value <= _I64_MAX and not as_decimal:
        return int(value)
    return _decimal_value(Decimal(repr(value)), path)


def _fits(value: Any, shape: CedarType) -> bool:
    if isinstance(shape, dict):
        return isinstance(value, Mapping)
    if isinstance(shape, tuple):
        return isinstance(value, list | tuple)
    if shape == "String":
        return isinstance(value, str)
    if shape == "Bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if shape == "Long":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, int | float)


def _describe(shape: CedarType) -> str:
    if isinstance(shape, dict):
        return "an object"
    if isinstance(shape, tuple):
        return "an array"
    return {"String": "a string", "Bool": "a boolean", "Long": "an integer"}.get(shape, "a number")


class _Walker:
    __slots__ = ("leaves",)

    def __init__(self) -> None:
        self.leaves = 0

    def leaf(self, path: str) -> None:
        self.leaves += 1
        if self.leaves > MAX_LEAVES:
            raise ArgumentError(f"argument {path}: more than {MAX_LEAVES} values in the arguments")

    def value(self, value: Any, path: str, depth: int, shape: CedarType | None) -> Any:
        if shape is not None and not _fits(value, shape):
            raise ArgumentError(
                f"argument {path}: expected {_describe(shape)}, as the tool's input schema says"
            )
        # bool before int: bool is a subclass of int.
        if isinstance(value, bool | str):
            self.leaf(path)
            return value
        if isinstance(value, int):
            self.leaf(path)
            if not _I64_MIN <= value <= _I64_MAX:
                raise ArgumentError(f"argument {path}: an integer beyond 64 bits")
            if shape == "decimal":
                return _decimal_value(Decimal(value), path)
            return value
        if isinstance(value, float):
            self.leaf(path)
            return _number(value, path, shape == "decimal")
        if isinstance(value, Mapping):
            return self.record(value, path, depth + 1, shape if isinstance(shape, dict) else None)
        if isinstance(value, list | tuple):
            if depth + 1 > MAX_DEPTH:
                raise ArgumentError(f"argument {path}: nested deeper than {MAX_DEPTH} levels")
            if not value:
                self.leaf(path)
            element = shape[1] if isinstance(shape, tuple) else None
            out = []
            for i, item in enumerate(value):
                if item is None:
                    raise ArgumentError(f"argument {path}[{i}]: null inside an array")
                out.append(self.value(item, f"{path}[{i}]", depth + 1, element))
            return out
        raise ArgumentError(f"argument {path}: unsupported value of type {type(value).__name__}")

    def record(
        self, value: Mapping[Any, Any], path: str, depth: int, shape: Mapping[str, CedarType] | None
    ) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise ArgumentError(f"argument {path}: nested deeper than {MAX_DEPTH} levels")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ArgumentError(f"argument {path}: a key that is not a string")
            sub = _path_join(path, key)
            if key in _RESERVED_KEYS:
                raise ArgumentError(f"argument {sub}: the key {key!r} is reserved by Cedar")
            if item is None:
                continue
            out[key] = self.value(item, sub, depth, shape.get(key) if shape else None)
        if not out:
            self.leaf(path)
        return out


def sanitize_args(args: Mapping[str, Any], types: Mapping[str, CedarType] | None = None) -> dict[str, Any]:
    """Untrusted tool arguments as a Cedar record, or ArgumentError naming the offending JSON path.

    `None` drops the key (a policy's `has` is then false: Cedar has no null); a `None` inside an
    array is refused, since dropping it would change positions. Integral floats become Longs,
    other floats Cedar decimals.

    `types` (the tool's own, from `arg_types_from_input_schema`) are enforced: a value of another
    type is refused, because a policy comparing `context.args.flag == true` is simply false for
    `"true"`, which a lenient tool server would still accept as true. Integers where the tool
    declares a JSON Schema `number` become decimals, so `5` and `5.0` compare alike.
    """
    if not isinstance(args, Mapping):
        raise ArgumentError("arguments: must be a JSON object")
    return _Walker().record(args, "$", 0, types)


def _resolve_ref(ref: str, root: Mapping[str, Any]) -> Any:
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _enum_type(values: Iterable[Any]) -> CedarType | None:
    kinds = set()
    for v in values:
        if isinstance(v, bool):
            kinds.add("Bool")
        elif isinstance(v, int):
            kinds.add("Long")
        elif isinstance(v, str):
            kinds.add("String")
        elif v is None:
            continue
        else:
            return None
    return kinds.pop() if len(kinds) == 1 else None


def _json_type(node: Any, root: Mapping[str, Any], depth: int) -> CedarType | None:
    """A JSON Schema node as a Cedar type, or None when it has no single Cedar type."""
    if depth > MAX_DEPTH or not isinstance(node, Mapping):
        return None
    ref = node.get("$ref")
    if isinstance(ref, str):
        return _json_type(_resolve_ref(ref, root), root, depth + 1)
    for combinator in ("anyOf", "oneOf", "allOf"):
        branches = node.get(combinator)
        if isinstance(branches, list):
            live = [b for b in branches if not (isinstance(b, Mapping) and b.get("type") == "null")]
            if combinator == "allOf" and len(live) != 1:
                return None
            return merge_arg_types([_json_type(b, root, depth + 1) for b in live]) if live else None
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
        if kind is None:
            return None
    if kind is None:
        if "enum" in node and isinstance(node["enum"], list):
            return _enum_type(node["enum"])
        if "const" in node:
            return _enum_type([node["const"]])
        if isinstance(node.get("properties"), Mapping):
            kind = "object"
        else:
            return None
    if kind == "integer":
        return "Long"
    if kind == "string":
        return "String"
    if kind == "boolean":
        return "Bool"
    if kind == "number":
        return "decimal"
    if kind == "array":
        element = _json_type(node.get("items"), root, depth + 1)
        return ("Set", element) if isinstance(element, str) else None
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, Mapping):
            return None
        record = _record(props, root, depth + 1)
        return record or None
    return None


def _record(props: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> dict[str, CedarType]:
    out: dict[str, CedarType] = {}
    for name, sub in props.items():
        if not isinstance(name, str):
            continue
        t = _json_type(sub, root, depth)
        if t is not None:
            out[name] = t
    return out


def arg_types_from_input_schema(schema: Mapping[str, Any]) -> dict[str, CedarType]:
    """One tool's top-level arguments as Cedar types; names without a single Cedar type are left out."""
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    if not isinstance(props, Mapping):
        return {}
    kinds: dict[str, CedarType | None] = {}
    for name, sub in props.items():
        if isinstance(name, str):
            kinds[name] = _json_type(sub, schema, 1)
    return {k: v for k, v in kinds.items() if v is not None}


def _all_props(schema: Mapping[str, Any]) -> list[str]:
    props = schema.get("properties") if isinstance(schema, Mapping) else None
    return [k for k in props if isinstance(k, str)] if isinstance(props, Mapping) else []


def merge_arg_types(types: list[CedarType | None]) -> CedarType | None:
    """The one type that fits every entry, or None on a conflict (records merge attribute-wise)."""
    if not types or any(t is None for t in types):
        return None
    first = types[0]
    if isinstance(first, str):
        return first if all(t == first for t in types) else None
    if isinstance(first, tuple):
        if not all(isinstance(t, tuple) for t in types):
            return None
        element = merge_arg_types([t[1] for t in types if isinstance(t, tuple)])
        return ("Set", element) if element is not None else None
    records = [t for t in types if isinstance(t, dict)]
    if len(records) != len(types):
        return None
    merged: dict[str, CedarType] = {}
    for name in sorted({n for r in records for n in r}):
        t = merge_arg_types([r[name] for r in records if name in r])
        if t is not None:
            merged[name] = t
    return merged or None


def cedar_string(text: str) -> str:
    """`text` as a Cedar string literal, quotes included."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _render(t: CedarType, indent: int) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, tuple):
        return f"Set<{_render(t[1], indent)}>"
    return render_record(t, indent)


def render_record(record: Mapping[str, CedarType], indent: int = 0) -> str:
    """A record type in Cedar schema syntax, every attribute optional (`"a"?: Long`)."""
    if not record:
        return "{}"
    pad = "  " * (indent + 1)
    lines = [f"{pad}{cedar_string(name)}?: {_render(t, indent + 1)}" for name, t in sorted(record.items())]
    return "{\n" + ",\n".join(lines) + "\n" + "  " * indent + "}"


def tool_args_record(schemas: Mapping[str, Mapping[str, Any]]) -> dict[str, CedarType]:
    """The attributes of `ToolArgs`: every tool's top-level arguments that have one Cedar type.

    A name whose type differs between tools, or has no Cedar type, is left out, so a policy that
    reads it fails validation instead of evaluating against a value of the wrong type.
    """
    seen: dict[str, list[CedarType | None]] = {}
    for _key, schema in sorted(schemas.items()):
        known = arg_types_from_input_schema(schema)
        for name in _all_props(schema):
            seen.setdefault(name, []).append(known.get(name))
    record: dict[str, CedarType] = {}
    for name, types in seen.items():
        t = merge_arg_types(types)
        if t is not None:
            record[name] = t
    return record


def args_type_from_input_schemas(schemas: Mapping[str, Mapping[str, Any]]) -> str:
    """The Cedar common type `ToolArgs` (the type of `context.args`) for these tools.

    Keys of `schemas` are `<upstream>/<tool>`, values MCP `inputSchema`s. Every attribute is
    optional, since any tool may omit any of them (see `tool_args_record` for what is left out).
    """
    return f"type ToolArgs = {render_record(tool_args_record(schemas))};\n"
