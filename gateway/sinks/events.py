"""One audit record in a sink's format, with what every transport needs to frame it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from audit.export import cef_line, ocsf_event
from audit.record import parse_ts

_FAILED = frozenset({"failed", "timeout", "error", "interrupted"})


@dataclass(frozen=True, slots=True)
class Event:
    instance: str
    seq: int
    record_id: str
    hash: str
    prev_hash: str | None
    ts: str
    """The record's time, RFC 3339 UTC with microseconds (as stored)."""
    severity: int
    """Syslog severity: 4 warning (denied), 5 notice (approval asked, or the call failed), 6 info."""
    line: str
    """The record in the sink's format, on one line (no line break inside)."""


def severity(doc: dict[str, Any]) -> int:
    effect = (doc.get("decision") or {}).get("effect")
    status = (doc.get("outcome") or {}).get("status")
    if effect == "deny":
        return 4
    return 5 if effect == "approval_required" or status in _FAILED else 6


def render(fmt: str, instance: str, seq: int, text: str) -> Event:
    """`text` is the stored record: `jsonl` sends it byte for byte (what was hashed, so a receiver
    can recompute the chain); `splunk-hec` wraps it as a HEC event without re-encoding it."""
    doc = json.loads(text)
    if fmt == "jsonl":
        line = text
    elif fmt == "ocsf":
        line = json.dumps(ocsf_event(doc), ensure_ascii=False, separators=(",", ":"))
    elif fmt == "cef":
        line = cef_line(doc)
    elif fmt == "splunk-hec":
        head = {
            "time": round(parse_ts(str(doc["ts"])).timestamp(), 6),
            "host": instance,
            "source": "bastion",
            "sourcetype": "bastion:audit",
        }
        line = json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1] + ',"event":' + text + "}"
    else:  # the config admits only the formats above
        raise ValueError(f"unknown sink format {fmt!r}")
    return Event(
        instance=instance,
        seq=seq,
        record_id=str(doc.get("id")),
        hash=str(doc.get("hash")),
        prev_hash=doc.get("prev_hash"),
        ts=str(doc["ts"]),
        severity=severity(doc),
        line=line,
    )
