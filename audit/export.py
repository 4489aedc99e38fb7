"""Compliance export of the audit trail, streamed so the size of the store does not matter.

Formats: `jsonl` (the stored records, byte for byte what was hashed), `csv` (one flat row per
record, for spreadsheets), `ocsf` (one OCSF 1.3 API Activity event per line, for a SIEM) and
`cef` (one ArcSight CEF line per record). The audit sinks stream the same formats.
Records are read in pages by key, so memory stays flat whatever the number of records.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO, Unpack

from audit.record import parse_ts
from audit.store import AuditStore, RecordFilters

FORMATS = ("jsonl", "csv", "ocsf", "cef")
OCSF_VERSION = "1.3.0"

CSV_COLUMNS = (
    "id", "ts", "instance", "seq", "user", "tenant", "agent", "protocol", "upstream", "tool",
    "action", "effect", "policy_ids", "policy_version", "reasons", "status", "latency_ms",
    "upstream_status", "error", "trace_id", "call_id", "args_hmac", "result_sha256", "hash",
)  # fmt: skip

Progress = Callable[[int], None]


async def export_jsonl(
    store: AuditStore, out: TextIO, progress: Progress | None = None, **filters: Unpack[RecordFilters]
) -> int:
    """Write each stored record document on its own line in (ts, id) order; return the count."""
    n = 0
    async for text in store.iter_raw(**filters):
        out.write(text)
        out.write("\n")
        n += 1
        if progress is not None:
            progress(n)
    return n


async def export_csv(
    store: AuditStore, out: TextIO, progress: Progress | None = None, **filters: Unpack[RecordFilters]
) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    n = 0
    async for text in store.iter_raw(**filters):
        writer.writerow([_cell(v) for v in csv_row(json.loads(text))])
        n += 1
        if progress is not None:
            progress(n)
    return n


async def export_ocsf(
    store: AuditStore, out: TextIO, progress: Progress | None = None, **filters: Unpack[RecordFilters]
) -> int:
    n = 0
    async for text in store.iter_raw(**filters):
        out.write(json.dumps(ocsf_event(json.loads(text)), ensure_ascii=False, separators=(",", ":")))
        out.write("\n")
        n += 1
        if progress is not None:
            progress(n)
    return n


async def export_cef(
    store: AuditStore, out: TextIO, progress: Progress | None = None, **filters: Unpack[RecordFilters]
) -> int:
    n = 0
    async for text in store.iter_raw(**filters):
        out.write(cef_line(json.loads(text)))
        out.write("\n")
        n += 1
        if progress is not None:
            progress(n)
    return n


_EXPORTERS = {"jsonl": export_jsonl, "csv": export_csv, "ocsf": export_ocsf, "cef": export_cef}


def csv_row(doc: dict[str, Any]) -> list[Any]:
    decision = doc.get("decision") or {}
    outcome = doc.get("outcome") or {}
    reasons = "; ".join(
        f"{r.get('policy')}: {r.get('reason')}" for r in decision.get("reasons") or [] if isinstance(r, dict)
    )
    values = {
        **doc,
        "effect": decision.get("effect"),
        "policy_ids": ";".join(decision.get("policy_ids") or []),
        "policy_version": decision.get("policy_version"),
        "reasons": reasons,
        "status": outcome.get("status"),
        "latency_ms": outcome.get("latency_ms"),
        "upstream_status": outcome.get("upstream_status"),
        "error": outcome.get("error"),
    }
    return [values.get(col) for col in CSV_COLUMNS]


def _cell(value: Any) -> Any:
    """Text a spreadsheet would run as a formula is prefixed with `'` (OWASP CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


_SEVERITY = {"deny": (3, "Medium"), "approval_required": (2, "Low")}
_FAILED = {"failed", "timeout", "error", "interrupted", "dead_letter"}


def ocsf_event(doc: dict[str, Any]) -> dict[str, Any]:
    """One record as an OCSF API Activity event (class 6003): who called which tool, the
    decision and policy, the outcome; Bastion-specific fields go in `unmapped`."""
    decision = doc.get("decision") or {}
    outcome = doc.get("outcome") or {}
    effect = decision.get("effect")
    status = outcome.get("status")
    allowed = effect in ("allow", "transform")
    if status in _FAILED or status == "pending":
        severity = (2, "Low")
    else:
        severity = _SEVERITY.get(str(effect), (1, "Informational"))
    if not allowed:
        status_id, status_name = 2, "Failure"
    elif status == "completed":
        status_id, status_name = 1, "Success"
    elif status in _FAILED:
        status_id, status_name = 2, "Failure"
    else:
        status_id, status_name = 0, "Unknown"
    reasons = [r for r in decision.get("reasons") or [] if isinstance(r, dict)]
    detail = "; ".join(f"{r.get('policy')}: {r.get('reason')}" for r in reasons) or outcome.get("error")
    ts = parse_ts(str(doc["ts"]))
    activity_id = 99
    event: dict[str, Any] = {
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": str(doc.get("action") or "call_tool"),
        "type_uid": 6003 * 100 + activity_id,
        "type_name": f"API Activity: {doc.get('action') or 'call_tool'}",
        "time": int(ts.timestamp() * 1000),
        "time_dt": doc["ts"],
        "severity_id": severity[0],
        "severity": severity[1],
        "status_id": status_id,
        "status": status_name,
        "status_code": str(status),
        "status_detail": detail,
        "action_id": 1 if allowed else 2,
        "action": "Allowed" if allowed else "Denied",
        "disposition_id": 1 if allowed else 2,
        "disposition": "Allowed" if allowed else "Blocked",
        "duration": outcome.get("latency_ms"),
        "metadata": {
            "version": OCSF_VERSION,
            "uid": doc.get("id"),
            "correlation_uid": doc.get("trace_id"),
            "log_name": "bastion-audit",
            "product": {"name": "Bastion", "vendor_name": "Bastion", "feature": {"name": "audit"}},
            "original_time": doc["ts"],
        },
        "actor": {
            "user": {
                "uid": doc.get("user"),
                "name": doc.get("user"),
                **({"org": {"uid": doc["tenant"]}} if doc.get("tenant") else {}),
            },
            "app_name": doc.get("agent"),
            "authorizations": [
                {
                    "decision": effect,
                    "policy": {
                        "uid": pid,
                        "name": pid,
                        "version": decision.get("policy_version"),
                    },
                }
                for pid in (decision.get("policy_ids") or [None])
            ],
        },
        "api": {
            "operation": doc.get("tool"),
            "service": {"name": doc.get("upstream")},
            "request": {"uid": doc.get("call_id") or doc.get("id")},
            "response": {
                "code": outcome.get("upstream_status"),
                **({"error": str(status), "error_message": outcome["error"]} if outcome.get("error") else {}),
            },
        },
        "src_endpoint": {"name": doc.get("agent") or doc.get("user") or "unknown"},
        "dst_endpoint": {"svc_name": doc.get("upstream")},
        "resources": [
            {"uid": f"{doc.get('upstream')}/{doc.get('tool')}", "name": doc.get("tool"), "type": "mcp_tool"}
        ],
        "unmapped": {
            k: doc.get(k)
            for k in (
                "instance",
                "seq",
                "schema_version",
                "protocol",
                "client",
                "delegation_chain",
                "args_redacted",
                "args_hmac",
                "budget",
                "pii",
                "result_sha256",
                "prev_hash",
                "hash",
            )
        },
    }
    return event


CEF_VENDOR, CEF_PRODUCT = "Bastion", "Bastion"
_CEF_SEVERITY = {"deny": 7, "approval_required": 5}
_CEF_FIELD_MAX = 1023
"""Longest value written for one CEF field (a caller-chosen tool name or reason could be huge)."""


def _cef_header(value: object) -> str:
    return _cef_escaped(value, "|")


def _cef_value(value: object) -> str:
    return _cef_escaped(value, "=")


def _cef_escaped(value: object, special: str) -> str:
    """`\\`, the field's delimiter (`|` in the header, `=` in extensions) and line breaks escaped as
    CEF says; other control characters written as visible `\\uXXXX` text (its backslash escaped),
    so no value can start a new line, frame or field at the receiver."""
    text = str(value)[:_CEF_FIELD_MAX]
    if text.isprintable() and "\\" not in text and special not in text:
        return text
    out = []
    for c in text:
        if c == "\\" or c == special:
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\r":
            out.append("\\r")
        elif not c.isprintable():
            out.append(f"\\\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def cef_line(doc: dict[str, Any]) -> str:
    """One record as an ArcSight CEF (rev. 25) line: a summary with the chain position and hash
    (`cn1` seq, `cs2` hash, `cs3` prevHash, `deviceExternalId` instance). The full record
    (arguments, budget, PII counts) is in the jsonl and ocsf formats."""
    decision = doc.get("decision") or {}
    outcome = doc.get("outcome") or {}
    effect = str(decision.get("effect"))
    status = str(outcome.get("status"))
    action = str(doc.get("action") or "call_tool")
    severity = _CEF_SEVERITY.get(effect, 5 if status in _FAILED else 3)
    reasons = "; ".join(
        f"{r.get('policy')}: {r.get('reason')}" for r in decision.get("reasons") or [] if isinstance(r, dict)
    )
    target = f"{doc.get('upstream')}/{doc.get('tool')}"
    header = [
        "CEF:0", CEF_VENDOR, CEF_PRODUCT, str(doc.get("schema_version")), f"{action}:{effect}",
        f"{action} {target} {effect}", str(severity),
    ]  # fmt: skip
    ext: list[tuple[str, object]] = [
        ("rt", int(parse_ts(str(doc["ts"])).timestamp() * 1000)),
        ("externalId", doc.get("id")),
        ("deviceExternalId", doc.get("instance")),
        ("cn1Label", "seq"),
        ("cn1", doc.get("seq")),
        ("cs2Label", "hash"),
        ("cs2", doc.get("hash")),
        ("cs3Label", "prevHash"),
        ("cs3", doc.get("prev_hash")),
        ("suser", doc.get("user")),
        ("cs1Label", "tenant"),
        ("cs1", doc.get("tenant")),
        ("cs6Label", "agent"),
        ("cs6", doc.get("agent")),
        ("app", doc.get("protocol")),
        ("destinationServiceName", doc.get("upstream")),
        ("flexString2Label", "tool"),
        ("flexString2", doc.get("tool")),
        ("act", effect),
        ("outcome", status),
        ("reason", reasons or outcome.get("error")),
        ("cs4Label", "policyIds"),
        ("cs4", ",".join(str(p) for p in decision.get("policy_ids") or [])),
        ("cs5Label", "callId"),
        ("cs5", doc.get("call_id")),
        ("flexString1Label", "traceId"),
        ("flexString1", doc.get("trace_id")),
        ("cn2Label", "latencyMs"),
        ("cn2", outcome.get("latency_ms")),
    ]
    fields = " ".join(f"{k}={_cef_value(v)}" for k, v in ext if v not in (None, ""))
    return "|".join(_cef_header(h) for h in header) + "|" + fields


class ProgressBar:
    """`exported 1,234/200,000 [#####.....] 50%` on a terminal's stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, stream: TextIO, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self._last = 0.0

    def __call__(self, n: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.1 and n != self.total:
            return
        self._last = now
        frac = n / self.total if self.total else 1.0
        done = int(frac * self.width)
        bar = "#" * done + "." * (self.width - done)
        self.stream.write(f"\rexported {n:,}/{self.total:,} [{bar}] {frac:4.0%}")
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def run_export(
    url: str,
    fmt: str,
    output: str | None,
    *,
    since: datetime | None,
    until: datetime | None,
    user: str | None,
    tool: str | None,
    effect: str | None,
    status: str | None,
    call_id: str | None = None,
    protocol: str | None = None,
    progress: bool | None = None,
) -> int:
    """Export to `output` (stdout when None or "-"); return the number of records.

    A file appears under its final name only when complete: a failed export leaves no
    truncated file that could pass for the whole trail. `progress=None` shows a bar when
    stderr is a terminal and the records go to a file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt} is not supported; use one of {', '.join(FORMATS)}")
    filters: RecordFilters = {
        "since": since,
        "until": until,
        "user": user,
        "tool": tool,
        "effect": effect,
        "status": status,
        "call_id": call_id,
        "protocol": protocol,
    }
    to_stdout = output is None or output == "-"
    if progress is None:
        progress = sys.stderr.isatty() and not (to_stdout and sys.stdout.isatty())
    if to_stdout:
        return asyncio.run(_export(url, fmt, sys.stdout, filters, progress))
    assert output is not None
    partial = f"{output}.partial"
    try:
        with open(partial, "w", encoding="utf-8", newline="") as out:
            n = asyncio.run(_export(url, fmt, out, filters, progress))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, output)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    return n


async def _export(url: str, fmt: str, out: TextIO, filters: RecordFilters, progress: bool) -> int:
    store = await AuditStore.open(url, create=False)
    try:
        bar = ProgressBar(await store.count(**filters), sys.stderr) if progress else None
        n = await _EXPORTERS[fmt](store, out, bar, **filters)
        if bar is not None:
            bar.finish()
        return n
    finally:
        await store.close()
