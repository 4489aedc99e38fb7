"""Pinned tool definitions: a tool whose definition is new or changed is held back until approved.

A server can change what a tool says after it was trusted (a "rug pull"): the model reads the
new description on the next `tools/list` and follows whatever it now asks. Bastion remembers a
SHA-256 of each tool's definition (name, title, description, inputSchema, outputSchema,
annotations as canonical JSON; `_meta` and icons are left out) per upstream in the state DB, so
every replica sees the same pins. A tool is usable only while the definition the upstream serves
is the approved one; otherwise it is removed from `tools/list` and its calls are refused (stage
`pinning`), until `bastion tools approve`.

Definitions are learned from every `tools/list` answer that crosses Bastion and from the
start-up discovery; a `tools/call` for a tool never seen makes Bastion list the upstream's tools
first. Each new definition is scanned (`gateway.redaction.injection`); a flagged one is never approved
automatically, whatever the mode.

The per-call check reads an in-memory copy of the pins, re-read from the DB every
`pinning.refresh_s`: an approval made with the CLI (another process) takes effect within that.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Column, String, Table, Text, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.config import PinningConfig
from gateway.errors import PinsUnavailable
from gateway.redaction.injection import Finding, scan_tool
from gateway.state.db import STATE_ERRORS, metadata

__all__ = ["Pin", "ToolPins", "approve", "definition_of", "list_pins", "reject"]

log = logging.getLogger("bastion.pinning")

PINNED_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
MAX_TOOL_NAME = 256

tool_pins = Table(
    "bastion_tool_pins",
    metadata,
    Column("upstream", String(128), primary_key=True),
    Column("tool", String(MAX_TOOL_NAME), primary_key=True),
    Column("current_sha256", String(64), nullable=False),
    Column("current_definition", Text, nullable=False),
    Column("findings", Text, nullable=False),
    Column("approved_sha256", String(64)),
    Column("approved_definition", Text),
    Column("rejected_sha256", String(64)),
    Column("first_seen", String(40), nullable=False),
    Column("changed_at", String(40), nullable=False),
    Column("decided_at", String(40)),
    Column("decided_by", String(200)),
)

Status = Literal["approved", "new", "changed", "rejected"]


def definition_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The parts of a tool definition that the model reads and that are pinned."""
    return {k: tool[k] for k in PINNED_FIELDS if k in tool}


def canonical(definition: dict[str, Any]) -> str:
    return json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Pin:
    """One upstream tool as Bastion last saw it, and what was approved for it."""

    upstream: str
    tool: str
    current_sha256: str
    current_definition: str
    findings: tuple[Finding, ...]
    approved_sha256: str | None
    approved_definition: str | None
    rejected_sha256: str | None
    first_seen: str
    changed_at: str
    decided_at: str | None
    decided_by: str | None

    @property
    def status(self) -> Status:
        if self.current_sha256 == self.approved_sha256:
            return "approved"
        if self.current_sha256 == self.rejected_sha256:
            return "rejected"
        return "new" if self.approved_sha256 is None else "changed"

    @property
    def usable(self) -> bool:
        return self.status == "approved"

    @property
    def ref(self) -> str:
        return f"{self.upstream}/{self.tool}"

    def why_not(self) -> str:
        """The reason a quarantined tool's call is refused, naming the tool and what to do."""
        what = {
            "new": "is new and not approved",
            "changed": "changed its definition since it was approved and is not approved",
            "rejected": "has a definition that was rejected: not approved",
        }.get(self.status, "is not approved")
        return f"tool {self.ref} {what} (an operator can review it: bastion tools diff {self.ref})"

    def to_json(self) -> dict[str, Any]:
        return {
            "upstream": self.upstream,
            "tool": self.tool,
            "status": self.status,
            "sha256": self.current_sha256,
            "approved_sha256": self.approved_sha256,
            "findings": [f.to_json() for f in self.findings],
            "first_seen": self.first_seen,
            "changed_at": self.changed_at,
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
        }

    @classmethod
    def of_row(cls, row: Any) -> Pin:
        try:
            findings = tuple(Finding.of(f) for f in json.loads(row.findings) if isinstance(f, dict))
        except ValueError:
            findings = (Finding("unreadable", "findings", "stored findings are not JSON"),)
        return cls(
            row.upstream,
            row.tool,
            row.current_sha256,
            row.current_definition,
            findings,
            row.approved_sha256,
            row.approved_definition,
            row.rejected_sha256,
            row.first_seen,
            row.changed_at,
            row.decided_at,
            row.decided_by,
        )


class ToolPins:
    """The pins, as this replica knows them; writes go to the state DB at once."""

    def __init__(self, engine: AsyncEngine, cfg: PinningConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self._pins: dict[tuple[str, str], Pin] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.cfg.mode != "off"

    async def _fresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._loaded_at < self.cfg.refresh_s:
            return
        async with self._lock:
            if not force and time.monotonic() - self._loaded_at < self.cfg.refresh_s:
                return
            started = time.monotonic()
            async with self.engine.connect() as conn:
                rows = (await conn.execute(select(tool_pins))).all()
            self._pins = {(r.upstream, r.tool): Pin.of_row(r) for r in rows}
            self._loaded_at = started

    async def get(self, upstream: str, tool: str) -> Pin | None:
        await self._fresh()
        return self._pins.get((upstream, tool))

    async def observe(self, upstream: str, tools: list[dict[str, Any]]) -> dict[str, str]:
        """Record the definitions an upstream serves; new or changed ones are scanned and pinned.

        Returns the hash of each definition seen, by tool name.
        """
        seen: dict[str, str] = {}
        if not self.enabled:
            return seen
        await self._fresh()
        names = [t["name"] for t in tools if isinstance(t.get("name"), str)]
        for tool in tools:
            name = tool.get("name")
            if not isinstance(name, str) or not name or len(name) > MAX_TOOL_NAME:
                continue
            text = canonical(definition_of(tool))
            sha = seen[name] = sha256_of(text)
            pin = self._pins.get((upstream, name))
            if pin is not None and pin.current_sha256 == sha:
                continue
            findings = scan_tool(tool, names, self.cfg.max_description_chars)
            await self._record(upstream, name, sha, text, findings, pin)
        return seen

    async def _record(
        self, upstream: str, name: str, sha: str, text: str, findings: list[Finding], pin: Pin | None
    ) -> None:
        mode = self.cfg.mode
        auto = not findings and (mode == "auto_approve" or (mode == "tofu" and pin is None))
        now = _now()
        values: dict[str, Any] = {
            "current_sha256": sha,
            "current_definition": text,
            "findings": json.dumps([f.to_json() for f in findings]),
            "changed_at": now,
        }
        if auto:
            how = "first use" if pin is None and mode == "tofu" else "auto_approve"
            values |= {"approved_sha256": sha, "approved_definition": text, "decided_at": now}
            values["decided_by"] = f"bastion ({how})"
        raced = False
        async with self.engine.begin() as conn:
            if pin is None:
                try:
                    async with conn.begin_nested():
                        await conn.execute(
                            insert(tool_pins).values(upstream=upstream, tool=name, first_seen=now, **values)
                        )
                except IntegrityError:
                    raced = True  # another replica pinned it first: take its row
            else:
                await conn.execute(
                    update(tool_pins)
                    .where(tool_pins.c.upstream == upstream, tool_pins.c.tool == name)
                    .values(**values)
                )
            row = (
                await conn.execute(
                    select(tool_pins).where(tool_pins.c.upstream == upstream, tool_pins.c.tool == name)
                )
            ).one()
        new = self._pins[(upstream, name)] = Pin.of_row(row)
        if raced:
            if new.current_sha256 != sha:  # it saw another definition than this one: a change
                await self._record(upstream, name, sha, text, findings, new)
            return
        if not new.usable:
            kinds = ", ".join(sorted({f.kind for f in findings})) or "no findings"
            log.warning(
                "tool %s is %s and held back until approved (%s): bastion tools diff %s",
                new.ref,
                new.status,
                kinds,
                new.ref,
            )

    async def keep_usable(self, upstream: str, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pin what `tools/list` returned and keep only the tools whose definition is approved."""
        if not self.enabled:
            return tools
        try:
            seen = await self.observe(upstream, tools)
        except STATE_ERRORS as exc:
            log.error("tool pins unavailable, tools/list of %s withheld: %s", upstream, type(exc).__name__)
            raise PinsUnavailable("tool pins are unavailable (state DB), so no tool can be listed") from exc
        kept = []
        for tool in tools:
            name = str(tool.get("name"))
            pin = self._pins.get((upstream, name))
            if pin is not None and pin.usable and pin.approved_sha256 == seen.get(name):
                kept.append(tool)
        return kept


# -- operator commands (`bastion tools ...`) -------------------------------------------------


def _match(upstream: str | None, tool: str | None) -> list[Any]:
    where = []
    if upstream:
        where.append(tool_pins.c.upstream == upstream)
    if tool:
        where.append(tool_pins.c.tool == tool)
    return where


async def list_pins(engine: AsyncEngine, upstream: str | None = None, tool: str | None = None) -> list[Pin]:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(tool_pins)
                .where(*_match(upstream, tool))
                .order_by(tool_pins.c.upstream, tool_pins.c.tool)
            )
        ).all()
    return [Pin.of_row(r) for r in rows]


async def approve(
    engine: AsyncEngine, upstream: str, tool: str | None, by: str, sha_prefix: str | None = None
) -> list[Pin]:
    """Approve the current definition of one tool (or of every unapproved tool of an upstream).

    With `sha_prefix`, only a definition whose hash starts with it is approved: what was reviewed
    in `bastion tools diff` is what gets approved, even if the upstream changed it since.
    """
    return await _decide(engine, upstream, tool, by, sha_prefix, approve=True)


async def reject(engine: AsyncEngine, upstream: str, tool: str | None, by: str) -> list[Pin]:
    """Mark the current definition rejected: it stays quarantined (a later change is reviewed anew)."""
    return await _decide(engine, upstream, tool, by, None, approve=False)


async def _decide(
    engine: AsyncEngine, upstream: str, tool: str | None, by: str, sha_prefix: str | None, *, approve: bool
) -> list[Pin]:
    done = []
    async with engine.begin() as conn:
        rows = (await conn.execute(select(tool_pins).where(*_match(upstream, tool)))).all()
        for row in rows:
            pin = Pin.of_row(row)
            if pin.usable if approve else pin.status == "rejected":
                continue
            if sha_prefix and not pin.current_sha256.startswith(sha_prefix):
                continue
            now = _now()
            values: dict[str, str | None]
            if approve:
                values = {
                    "approved_sha256": pin.current_sha256,
                    "approved_definition": pin.current_definition,
                }
            else:
                values = {"rejected_sha256": pin.current_sha256}
                if pin.approved_sha256 == pin.current_sha256:
                    values |= {"approved_sha256": None, "approved_definition": None}
            await conn.execute(
                update(tool_pins)
                .where(
                    tool_pins.c.upstream == pin.upstream,
                    tool_pins.c.tool == pin.tool,
                    tool_pins.c.current_sha256 == pin.current_sha256,
                )
                .values(decided_at=now, decided_by=by[:200], **values)
            )
            done.append(pin)
    return done
