"""Scanning a JSON value's string leaves and rebuilding it with some leaves replaced.

Keys and structure are kept; only leaves change. Numbers with 7 or more digits are scanned as
text (a card number sent as a JSON integer is still a card number); other numbers, booleans
and null cannot hold an entity and are skipped. Leaves are scanned in document order until
`limit` bytes have been scanned; the leaf that crosses the limit is scanned up to it, and what
lies beyond is reported as unscanned so the caller can apply `over_limit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from gateway.redaction.engine import MIN_LEN, Finding, Scanner

__all__ = ["Hit", "Path", "Scan", "leaves", "rebuild", "scan_json"]

Path: TypeAlias = tuple[str | int, ...]
_BIG_INT = 10**6


@dataclass(slots=True)
class Hit:
    """A leaf with findings: its normalised scanned text, the findings in it, and any unscanned tail."""

    path: Path
    text: str
    findings: list[Finding]
    tail: str = ""


@dataclass(slots=True)
class Scan:
    hits: list[Hit] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    unscanned: list[Path] = field(default_factory=list)
    """Leaves not scanned to their end (the scan limit was reached)."""
    unscanned_bytes: int = 0

    @property
    def types(self) -> set[str]:
        return set(self.counts)


def leaves(
    value: Any, skip_keys: frozenset[str] = frozenset(), path: Path = ()
) -> Iterator[tuple[Path, str]]:
    """(path, text) of every leaf that could hold an entity, in document order."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in skip_keys:
                yield from leaves(v, skip_keys, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, skip_keys, (*path, i))
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _BIG_INT:
        yield path, str(value)


def _size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def scan_json(scanner: Scanner, value: Any, limit: int, skip_keys: frozenset[str] = frozenset()) -> Scan:
    scan = Scan()
    budget = limit
    for path, text in leaves(value, skip_keys):
        if len(text) < MIN_LEN:
            continue
        size = _size(text)
        tail = ""
        if size > budget:
            if budget <= 0:
                scan.unscanned.append(path)
                scan.unscanned_bytes += size
                continue
            cut = text.encode("utf-8")[:budget].decode("utf-8", "ignore")
            tail = text[len(cut) :]
            scan.unscanned.append(path)
            scan.unscanned_bytes += size - budget
            text = cut
            budget = 0
        else:
            budget -= size
        norm, findings = scanner.find(text)
        if findings:
            scan.hits.append(Hit(path, norm, findings, tail))
            for f in findings:
                for t in f.counted:
                    scan.counts[t] = scan.counts.get(t, 0) + 1
    return scan


def rebuild(value: Any, replacements: Mapping[Path, Any]) -> Any:
    """A copy of `value` with the leaves at `replacements`' paths replaced; untouched parts are shared."""
    if not replacements:
        return value
    prefixes = {p[:i] for p in replacements for i in range(len(p))}
    return _rebuild(value, (), replacements, prefixes)


def _rebuild(value: Any, path: Path, repl: Mapping[Path, Any], prefixes: set[Path]) -> Any:
    if path in repl:
        return repl[path]
    if path not in prefixes:
        return value
    if isinstance(value, dict):
        return {k: _rebuild(v, (*path, k), repl, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebuild(v, (*path, i), repl, prefixes) for i, v in enumerate(value)]
    return value


def apply(scan: Scan, value: Any, render: Callable[[Hit], Any]) -> Any:
    """`value` with every hit's leaf replaced by `render(hit)`."""
    return rebuild(value, {h.path: render(h) for h in scan.hits})
