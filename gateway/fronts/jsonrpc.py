"""JSON-RPC 2.0 framing for the MCP front: strict parsing in, compact bytes out.

An MCP request must be exactly one JSON-RPC message. Batches and duplicate keys are refused:
two parsers that disagree on which duplicate wins (Bastion's and the upstream's) would let a
caller show policy one tool name and run another.

The body must be UTF-8 (`json.loads` alone also takes UTF-16 and UTF-32, and lets surrogates
encoded in the bytes through) and every string in it valid Unicode: an unpaired
`\\ud800`-`\\udfff` escape makes a string that cannot be encoded again, which would break
Bastion (the audit record, the forwarded body) after the call was admitted. Both are parse errors
(-32700), like any other text that is not JSON. A `method` is 1-128 characters of
`A-Z a-z 0-9 / _ - . :` (every MCP method fits): it is copied into an upstream header.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeAlias

from gateway.errors import ProtocolError

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020
MAX_DEPTH = 64
"""Default of listen.max_json_depth."""
MAX_METHOD = 128
_NOT_METHOD = re.compile(r"[^A-Za-z0-9/_.:-]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$@-]{1,64}")

Message = dict[str, Any]
_Trail: TypeAlias = tuple["_Trail", str | int] | None
"""The keys and indexes from the message down to a value, innermost last."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ProtocolError(f"duplicate JSON key {dup[:64]!r}", PARSE_ERROR)
    return obj


def _no_constant(name: str) -> Any:
    """`NaN`, `Infinity` and `-Infinity` are not JSON (RFC 8259), though Python's parser takes them:
    no canonical form, no hash, and Cedar refuses them."""
    raise ProtocolError(f"{name} is not a JSON value", PARSE_ERROR)


def parse_json(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """JSON with duplicate keys refused (see the module docstring), nested at most `max_depth` deep."""
    too_deep = ProtocolError(
        f"JSON nested deeper than {max_depth} levels (listen.max_json_depth)", INVALID_REQUEST
    )
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProtocolError("body is not valid JSON: it is not UTF-8 text", PARSE_ERROR) from exc
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError as exc:
        raise too_deep from exc
    except ValueError as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError("body is not valid JSON", PARSE_ERROR) from exc
    if body.count(b"{") + body.count(b"[") > max_depth and _depth(value) > max_depth:
        raise too_deep
    if _SURROGATE_ESCAPE.search(body) is not None and (where := _lone_surrogate(value)) is not None:
        raise ProtocolError(
            f"a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair) in {where}: "
            "JSON strings must be valid Unicode",
            PARSE_ERROR,
        )
    return value


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (a scalar: 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _lone_surrogate(value: Any) -> str | None:
    """Where the first string or key holding a lone surrogate is (a path such as
    `params.arguments.text`), or None."""
    stack: list[tuple[Any, _Trail]] = [(value, None)]
    while stack:
        node, trail = stack.pop()
        if isinstance(node, str):
            if not node.isascii() and _SURROGATE.search(node):
                return _path(trail)
        elif isinstance(node, dict):
            for key, child in node.items():
                if not key.isascii() and _SURROGATE.search(key):
                    return f"a key of {_path(trail)}"
                stack.append((child, (trail, key)))
        elif isinstance(node, list):
            stack.extend((child, (trail, i)) for i, child in enumerate(node))
    return None


def _path(trail: _Trail) -> str:
    parts: list[str] = []
    while trail is not None:
        trail, step = trail
        if isinstance(step, int):
            parts.append(f"[{step}]")
        elif _PLAIN_KEY.fullmatch(step):
            parts.append(f".{step}")
        else:
            parts.append(f"[{step[:32]!a}]")
    return "".join(reversed(parts)).removeprefix(".") or "the message"


def method_problem(method: str) -> str | None:
    """Why `method` cannot be a JSON-RPC method here, without echoing what it holds; or None."""
    bad = _NOT_METHOD.search(method)
    if bad is not None:
        return (
            f'"method" holds the character U+{ord(bad.group()):04X} at offset {bad.start()}: '
            "a method is made of ASCII letters, digits and / _ - . :"
        )
    if not 0 < len(method) <= MAX_METHOD:
        return f'"method" must be 1 to {MAX_METHOD} characters long (it has {len(method)})'
    return None


def parse(body: bytes, max_depth: int = MAX_DEPTH) -> Message:
    """One JSON-RPC request, notification or response; anything else is a ProtocolError."""
    msg = parse_json(body, max_depth)
    if isinstance(msg, list):
        raise ProtocolError("JSON-RPC batches are not accepted: send one message per request")
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
        raise ProtocolError('not a JSON-RPC 2.0 message (expected an object with "jsonrpc": "2.0")')
    if "method" in msg:
        if not isinstance(msg["method"], str):
            raise ProtocolError('"method" must be a string')
        if (problem := method_problem(msg["method"])) is not None:
            raise ProtocolError(problem)
        params = msg.get("params")
        if params is not None and not isinstance(params, dict):
            raise ProtocolError('"params" must be an object')
    elif "result" not in msg and "error" not in msg:
        raise ProtocolError('a JSON-RPC message needs "method", "result" or "error"')
    if ("id" in msg and not isinstance(msg["id"], str | int)) or isinstance(msg.get("id"), bool):
        raise ProtocolError('"id" must be a string or an integer')
    return msg


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def error(msg_id: Any, code: int, message: str, data: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return dumps({"jsonrpc": "2.0", "id": msg_id, "error": err})


def result(msg_id: Any, value: Any) -> bytes:
    return dumps({"jsonrpc": "2.0", "id": msg_id, "result": value})


def sse(data: str | bytes, event_id: str | None = None, event: str = "message") -> bytes:
    """One SSE event; multi-line data becomes several `data:` fields as the SSE format requires."""
    text = data.decode() if isinstance(data, bytes) else data
    lines = [f"event: {event}"] if event else []
    if event_id:
        lines.append(f"id: {event_id}")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()
