"""The audit record: one per tool call, versioned, JSON-serialisable, free of raw argument values."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

SCHEMA_VERSION = 2
"""2: `seq` (the record's place in its instance's chain), `prev_hash`/`hash` filled, `pending` status."""

PENDING = "pending"
INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """What Bastion saw and decided for one call. Field names are the user-facing contract."""

    id: str
    ts: datetime
    schema_version: int = SCHEMA_VERSION
    instance: str
    trace_id: str
    call_id: str | None
    user: str | None
    tenant: str | None
    agent: str | None
    delegation_chain: list[str] = field(default_factory=list)
    protocol: str
    client: str | None = None
    llm: dict[str, str] | None = None
    """A tool call a model asked for (`protocol: "llm"`): the `provider` and `model`; absent otherwise."""
    a2a: dict[str, str] | None = None
    """An agent-to-agent message (`protocol: "a2a"`): `method`, `task_id`, `context_id`; else absent."""
    replay: dict[str, Any] | None = None
    """What `bastion policy replay` needs that the other fields do not hold: the caller's `issuer`,
    `groups`, `roles`, `scopes`, whether it had an e-mail address (`has_email`; never the address),
    whether the session was `tainted`, the A2A `skill`, and `policy`, the policy stage's own
    verdict (`effect`, `policy_ids`) when it ran. Absent on records made before it existed, and on
    calls refused before anyone was known."""
    upstream: str
    tool: str
    action: str
    args_redacted: dict[str, Any]
    args_hmac: str | None
    decision: dict[str, Any]
    budget: dict[str, Any] | None
    pii: dict[str, Any]
    outcome: dict[str, Any]
    result_sha256: str | None
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def __post_init__(self) -> None:
        if self.ts.tzinfo is None or self.ts.utcoffset() is None:
            raise ValueError("AuditRecord.ts must be timezone-aware")
        object.__setattr__(self, "ts", self.ts.astimezone(UTC))

    def but(self, **changes: Any) -> AuditRecord:
        """A copy with `changes` (validated field names), without `dataclasses.replace`'s
        re-run of `__init__`: the writer makes two copies of every record it chains."""
        unknown = changes.keys() - _FIELD_SET
        if unknown:
            raise TypeError(f"AuditRecord has no field(s) {', '.join(sorted(unknown))}")
        new = object.__new__(AuditRecord)
        for name in _FIELDS:
            object.__setattr__(new, name, changes[name] if name in changes else getattr(self, name))
        return new

    @property
    def effect(self) -> str | None:
        value = self.decision.get("effect")
        return value if isinstance(value, str) else None

    @property
    def status(self) -> str | None:
        value = self.outcome.get("status")
        return value if isinstance(value, str) else None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types in contract order; `ts` as ISO-8601 UTC with microseconds and `Z`."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        out["ts"] = format_ts(self.ts)
        if self.llm is None:
            del out["llm"]  # kept out of other records, whose documents stay as they were
        if self.a2a is None:
            del out["a2a"]
        if self.replay is None:
            del out["replay"]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AuditRecord:
        """Inverse of `to_json`; unknown keys (from a newer schema) are ignored."""
        missing = [name for name in _REQUIRED if name not in d]
        if missing:
            raise ValueError(f"audit record is missing {', '.join(missing)}")
        kwargs = {k: v for k, v in d.items() if k in _FIELD_SET}
        kwargs["ts"] = parse_ts(d["ts"])
        return cls(**kwargs)


_FIELDS = tuple(f.name for f in fields(AuditRecord))
_FIELD_SET = frozenset(_FIELDS)
_REQUIRED = tuple(
    n
    for n in _FIELDS
    if n
    not in {
        "schema_version",
        "delegation_chain",
        "client",
        "llm",
        "a2a",
        "replay",
        "seq",
        "prev_hash",
        "hash",
    }
)


def format_ts(ts: datetime) -> str:
    """Fixed-width UTC text, so string order equals time order."""
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_ts(text: str) -> datetime:
    ts = datetime.fromisoformat(text)
    if ts.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return ts.astimezone(UTC)


def new_id(unguessable: bool = False) -> str:
    """A UUIDv7 (RFC 9562) string: unique and ordered by creation time, so ids sort like `ts`.

    Record ids need to be unique, not secret: their random bits come from `random` (reseeded in
    every forked worker). `unguessable` draws them from the kernel, for ids that are handed to
    people (approval ids)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big") if unguessable else random.getrandbits(80)
    value = (ms & (2**48 - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & (2**62 - 1)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 (JCS) bytes: keys sorted by UTF-16 code units, no whitespace, ECMAScript numbers.

    Stable across producers, so an HMAC or hash over it can be recomputed by any JCS library.
    Integers are written exactly (JCS assumes they fit in an IEEE double).

    orjson writes the same bytes (compact, keys sorted, strings escaped as JCS escapes them) for
    documents whose floats are first written the ECMAScript way (`orjson.Fragment`), whose keys
    are ASCII or at least below U+10000 (where code point and UTF-16 order agree) and whose
    integers fit in 64 bits; anything else takes the plain encoder below. Both are checked
    against each other on generated documents (tests/test_audit.py).
    """
    try:
        prepared = _for_orjson(obj)
        if prepared is not _SLOW:
            return orjson.dumps(prepared, option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        pass  # beyond 64 bits, a lone surrogate, a type JSON lacks: the plain encoder says which
    return canonical_json_plain(obj)


_SLOW = object()


_PLAIN = frozenset({str, int, bool, type(None)})
"""Types orjson writes exactly as JCS does (within 64 bits, for int)."""


def _for_orjson(obj: Any) -> Any:
    """`obj` with floats as ECMAScript-formatted fragments (a copy only where there are floats),
    or `_SLOW` when a key would sort differently in UTF-16. Written for speed: it walks every
    record that is hashed."""
    kind = type(obj)
    if kind is float:
        return orjson.Fragment(_es_number(obj))
    if kind is dict:
        out: dict[Any, Any] | None = None
        for key, value in obj.items():
            if type(key) is str and not key.isascii() and _astral(key):
                return _SLOW
            if type(value) in _PLAIN:
                continue
            new = _for_orjson(value)
            if new is _SLOW:
                return _SLOW
            if new is not value:
                if out is None:
                    out = dict(obj)
                out[key] = new
        return obj if out is None else out
    if kind is list or kind is tuple:
        items: list[Any] | None = None
        for i, value in enumerate(obj):
            if type(value) in _PLAIN:
                continue
            new = _for_orjson(value)
            if new is _SLOW:
                return _SLOW
            if new is not value:
                if items is None:
                    items = list(obj)
                items[i] = new
        return obj if items is None else items
    if isinstance(obj, float):  # a float subclass (Decimal-like values are refused below)
        return orjson.Fragment(_es_number(float(obj)))
    return obj  # str/int subclasses, or a type orjson refuses as the plain encoder would


def canonical_json_plain(obj: Any) -> bytes:
    """`canonical_json` written in Python: the reference the fast path is checked against."""
    parts: list[str] = []
    _encode(obj, parts)
    return "".join(parts).encode("utf-8")


def _encode(obj: Any, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append(_quote(obj))
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        out.append(_es_number(obj))
    elif isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise TypeError(f"canonical JSON needs string keys, got {type(key).__name__}")
        out.append("{")
        for i, key in enumerate(sorted(obj, key=_utf16) if any(_astral(k) for k in obj) else sorted(obj)):
            if i:
                out.append(",")
            out.append(_quote(key))
            out.append(":")
            _encode(obj[key], out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


_quote: Callable[[str], str] = json.encoder.encode_basestring


def _astral(key: str) -> bool:
    """Code point order equals UTF-16 order unless a key holds a character beyond U+FFFF."""
    return bool(key) and max(key) > "\uffff"


def _utf16(key: str) -> bytes:
    return key.encode("utf-16-be")


def _es_number(value: float) -> str:
    """ECMAScript Number::toString, which JCS prescribes (shortest round-trip digits)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("NaN and infinity are not valid JSON")
    if value == 0:
        return "0"
    _, digit_tuple, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    digits = "".join(map(str, digit_tuple))
    k = len(digits)
    n = k + int(exponent)
    prefix = "-" if value < 0 else ""
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"
    return prefix + text


def args_hmac(key: bytes, args: dict[str, Any]) -> str:
    """Keyed digest of the original arguments: links identical calls without storing values.

    A plain hash of a low-entropy value (an SSN, a PIN) can be brute-forced; a keyed one cannot
    without the key.
    """
    return hmac.new(key, canonical_json(args), hashlib.sha256).hexdigest()


def shape_of(args: Any) -> Any:
    """The arguments with every leaf replaced by its type (and size), keys kept.

    Stands in for redaction: the audit store never receives a raw argument value.
    """
    if isinstance(args, dict):
        return {str(k): shape_of(v) for k, v in args.items()}
    if isinstance(args, list | tuple):
        return [shape_of(v) for v in args]
    if args is None:
        return "<null>"
    if isinstance(args, bool):
        return "<bool>"
    if isinstance(args, int):
        return "<int>"
    if isinstance(args, float):
        return "<float>"
    if isinstance(args, str):
        return f"<string:{len(args)}>"
    if isinstance(args, bytes | bytearray):
        return f"<bytes:{len(args)}>"
    return f"<{type(args).__name__}>"
