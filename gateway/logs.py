"""Logging: one structured line per governed call, and the process-wide log setup.

The call line carries who, what and how it ended (trace id, audit id, user (`Principal.id`, as
in the audit record), agent, upstream, tool, effect, deciding stage and policy ids, status,
latency) and nothing the caller sent:
no arguments, no results, no tokens, no upstream error text (an upstream may echo arguments in
its errors). The audit record, not the log, is the place for the call's contents.

`setup` applies the config's `logging: {level, format}`; `json` writes one JSON object per line
(for Loki, Elasticsearch, CloudWatch), `text` a human-readable line.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from gateway.call import Decision, Outcome, ToolCall

CALLS = logging.getLogger("bastion.calls")
NOISY = ("httpx", "httpcore", "mcp.server.streamable_http_manager", "aiosqlite", "asyncio")
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, then any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """The classic line, with a call's fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return line


def setup(level: str = "info", fmt: Literal["json", "text"] = "json", stream: Any = None) -> None:
    """Route every logger (Bastion's, uvicorn's) to one handler on stderr in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    for name in NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def call_finished(call: ToolCall, decision: Decision, outcome: Outcome) -> None:
    """The call's one log line (INFO), with the fields listed in the module docstring."""
    if not CALLS.isEnabledFor(logging.INFO):
        return
    p = call.principal
    CALLS.info(
        "%s %s/%s %s",
        decision.effect,
        call.upstream,
        call.tool,
        outcome.status,
        extra={
            "trace_id": call.trace_id,
            "audit_id": call.audit_id,
            "user": p.id if p else None,
            "agent": p.agent if p else None,
            "upstream": call.upstream,
            "tool": call.tool,
            "action": call.action,
            "protocol": call.protocol,
            "effect": decision.effect,
            "stage": decision.stage,
            "policies": decision.policy_ids,
            "status": outcome.status,
            "upstream_status": outcome.upstream_status,
            "latency_ms": outcome.latency_ms,
        },
    )
