"""Detectors for instructions hidden in text a model will read: tool definitions (and results).

A tool's description and schema texts go straight into the model's context, so a server can
use them to steer the model ("tool poisoning"). The detectors are deliberately simple and
explainable; each finding names its kind, where it was found and a short excerpt:

- `hidden_characters`: invisible, bidi-control or Unicode tag characters (tag characters spell
  ASCII that renders as nothing; the decoded text is shown);
- `instruction_override`: "ignore previous instructions", "do not tell the user", `<IMPORTANT>`
  and the like;
- `tool_reference`: telling the model to call or avoid another tool, or naming one;
- `secret_reference`: SSH keys, `.env` files, API keys, passwords, credentials;
- `long_text`: a description longer than the configured limit (room to hide things).

They find the known phrasings of the attack, not every possible one: a finding means "a human
should read this", and no finding does not mean "safe" (docs/security.md).

Cost. A scan reads at most `MAX_CHARS` characters of a text and is linear in them: the patterns
have no adjacent repetitions that can match the same characters, and tool names are looked up
per word of the text in a set (`ToolNames`), not searched one by one, so a tool list of n tools
with n descriptions costs n scans, not n squared.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex  # type: ignore[import-untyped]

from gateway.redaction.normalize import normalize

__all__ = ["MAX_CHARS", "Finding", "ToolNames", "scan_text", "scan_tool"]

MAX_CHARS = 256 * 1024
"""Characters of one text that `scan_text` reads; `scan_tool` reports a longer text as `long_text`."""
_EXCERPT = 80


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    where: str
    excerpt: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "where": self.where, "excerpt": self.excerpt}

    @classmethod
    def of(cls, data: dict[str, Any]) -> Finding:
        return cls(str(data.get("kind", "")), str(data.get("where", "")), str(data.get("excerpt", "")))


_HIDDEN_EXTRA = frozenset({0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFFA0})


def _hidden(ch: str) -> bool:
    cp = ord(ch)
    if ch in "\n\r\t":
        return False
    return (
        unicodedata.category(ch) == "Cf"  # zero-width, bidi controls, soft hyphen, tag characters
        or cp in _HIDDEN_EXTRA
        or 0xE0100 <= cp <= 0xE01EF  # variation selectors supplement ("emoji smuggling")
    )


def _tag_text(text: str) -> str:
    """The ASCII spelled by Unicode tag characters (U+E0020..U+E007E), which render as nothing."""
    return "".join(chr(ord(c) - 0xE0000) for c in text if 0xE0020 <= ord(c) <= 0xE007E)


_OVERRIDE = regex.compile(
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}?\b(?:previous|prior|above|earlier|preceding"
    r"|all|any|other|system|your|the)\b[^.\n]{0,20}?\b(?:instructions?|prompts?|rules|directions|guidelines"
    r"|guardrails|polic(?:y|ies))\b"
    r"|\b(?:do\s+not|don'?t|never)\s+(?:tell|inform|mention|reveal|show|alert|notify)\b[^.\n]{0,20}?\buser\b"
    r"|\bwithout\s+(?:telling|informing|notifying|alerting|asking)\s+the\s+user\b"
    r"|\bthe\s+user\s+(?:must|should)\s+(?:not|never)\s+(?:know|see|be\s+told)\b"
    r"|<\s*+(?:/\s*+)?(?:important|system|instructions?|secret|hidden)\s*+>"
    r"|\[\s*(?:system|inst)\s*\]"
    r"|\b(?:system\s+prompt|new\s+instructions\s*:|you\s+are\s+now\b|from\s+now\s+on\b)",
    regex.IGNORECASE,
)
_CALL_OTHER = regex.compile(
    r"\b(?:call|use|invoke|run|execute|prefer|instead\s+of|before\s+(?:using|calling)|after\s+(?:using|calling))"
    r"\s+(?:the\s+|any\s+|every\s+)?(?:other\s+)?[`'\"]?([A-Za-z0-9_.-]+)[`'\"]?\s+(?:tool|function)s?\b",
    regex.IGNORECASE,
)
_SECRET = regex.compile(
    r"~/\.ssh|\bid_(?:rsa|ed25519|ecdsa)\b|(?<![\w.])\.env\b|\.aws/credentials|\.netrc\b|\bmcp\.json\b"
    r"|\bapi[ _-]?keys?\b|\bprivate[ _-]?keys?\b|\bpasswords?\b|\bpassphrases?\b|\bcredentials?\b"
    r"|\bsecret(?:s|[ _-]?keys?)?\b|\b(?:access|bearer|session|refresh)[ _-]?tokens?\b"
    r"|\bseed[ _-]?phrases?\b",
    regex.IGNORECASE,
)
_SPACES = regex.compile(r"\s+")


def _excerpt(text: str, start: int, end: int) -> str:
    lo = max(0, start - 20)
    snippet = text[lo : min(len(text), end + 20)]
    snippet = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in snippet)
    return snippet[:_EXCERPT]


class ToolNames:
    """Distinctive tool names, found in text in time linear in the text whatever their number.

    A name is mentioned where it stands alone: neither preceded nor followed by a word character
    or `-`. Names written the MCP way (word characters and `-`, up to three single dots) are found
    by looking up each dot-separated run of the text, and its runs of up to four parts, in a set.
    Other names are searched one by one, only the first `_MAX_ODD` of them: a list of many such
    names would otherwise make every scan as slow as the list is long."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names: set[str] = set()
        self._parts: set[int] = set()
        self._odd: list[tuple[str, Any]] = []
        for name in names:
            if not _distinctive(name):
                continue
            if _NAME.fullmatch(name) and name.count(".") <= _MAX_DOTS:
                self._names.add(name)
                self._parts.add(name.count(".") + 1)
            elif len(self._odd) < _MAX_ODD:
                self._odd.append((name, regex.compile(rf"(?<![\w-]){regex.escape(name)}(?![\w-])")))

    def find(self, text: str, own: str = "") -> tuple[int, int] | None:
        """The span of the first mention of a name other than `own` (compared case-insensitively)."""
        own = own.lower()
        if self._names:
            for m in _NAME.finditer(text):
                run: str = m.group()
                if "." not in run:
                    if run in self._names and run.lower() != own:
                        return m.start(), m.end()
                    continue
                parts = run.split(".")
                at: int = m.start()
                for i, part in enumerate(parts):
                    for n in self._parts:
                        name = ".".join(parts[i : i + n])
                        if i + n <= len(parts) and name in self._names and name.lower() != own:
                            return at, at + len(name)
                    at += len(part) + 1
        for name, rx in self._odd:
            if name.lower() != own and (found := rx.search(text)):
                return found.start(), found.end()
        return None


_SHORTEST = 6
_NOT_IN_SHORT_ASCII = frozenset({"hidden_characters", "instruction_override"})
"""Kinds that ASCII text shorter than `_SHORTEST` cannot hold: hidden characters are never ASCII,
and no override phrase is shorter than `[inst]`. A result may hold a million tiny strings."""
_NAME = regex.compile(r"[\w-]++(?:\.[\w-]++)*+")
_MAX_DOTS = 3
_MAX_ODD = 64


@lru_cache(maxsize=4)
def _tool_names(names: tuple[str, ...]) -> ToolNames:
    """One index per tool list: `scan_tool` runs once per tool of the same list."""
    return ToolNames(names)


def scan_text(
    text: str,
    where: str,
    other_tools: Iterable[str] | ToolNames = (),
    self_name: str = "",
    kinds: frozenset[str] | None = None,
) -> list[Finding]:
    """Findings in the first `MAX_CHARS` characters of a text; `other_tools` are names whose
    mention is suspicious.

    `kinds`: run only these detectors (None: all). Results need only two of them, and the
    others are the costly part of a scan."""
    text = text[:MAX_CHARS]
    if len(text) < _SHORTEST and text.isascii() and kinds is not None and kinds <= _NOT_IN_SHORT_ASCII:
        return []
    found: list[Finding] = []
    # Every hidden character is outside ASCII, and `isascii()` costs nothing: most text skips
    # the per-character loop.
    hidden = [] if text.isascii() else [c for c in text if _hidden(c)]
    if hidden:
        tags = _tag_text(text)
        codes = sorted({f"U+{ord(c):04X}" for c in hidden})
        detail = f"{len(hidden)} hidden character(s) {', '.join(codes[:6])}"
        if tags:
            detail += f"; tag characters spell {tags[:_EXCERPT]!r}"
        found.append(Finding("hidden_characters", where, detail[: 2 * _EXCERPT]))
    plain = normalize("".join(c for c in text if not _hidden(c)) if hidden else text)
    if hidden and (tags := _tag_text(text)):
        plain = f"{plain} {tags}"
    plain = _SPACES.sub(" ", plain)
    if m := _OVERRIDE.search(plain):
        found.append(Finding("instruction_override", where, _excerpt(plain, m.start(), m.end())))
    if kinds is not None and not kinds & {"tool_reference", "secret_reference"}:
        return [f for f in found if f.kind in kinds]
    own = self_name.lower()
    for m in _CALL_OTHER.finditer(plain):
        if m.group(1).lower() not in (own, "this", "that", "a", "an", "these"):
            found.append(Finding("tool_reference", where, _excerpt(plain, m.start(), m.end())))
            break
    else:
        names = other_tools if isinstance(other_tools, ToolNames) else ToolNames(other_tools)
        if span := names.find(plain, own):
            found.append(Finding("tool_reference", where, _excerpt(plain, *span)))
    if m3 := _SECRET.search(plain):
        found.append(Finding("secret_reference", where, _excerpt(plain, m3.start(), m3.end())))
    return found if kinds is None else [f for f in found if f.kind in kinds]


def _distinctive(name: str) -> bool:
    """Tool names that do not read as ordinary words ("read_note", not "add")."""
    return any(c in name for c in "_-.") or any(c.isupper() for c in name[1:])


def _texts(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string a model may read in a JSON schema or annotations: descriptions, titles, enums."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and len(key) > 40:
                yield f"{path}.<key>", key
            yield from _texts(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _texts(value, f"{path}[{i}]")


def scan_tool(tool: dict[str, Any], other_tools: Iterable[str], max_chars: int) -> list[Finding]:
    """Findings in a tool definition: its description, title, schemas and annotations."""
    name = str(tool.get("name", ""))
    names = _tool_names(tuple(other_tools))
    limit = min(max_chars, MAX_CHARS)
    found: list[Finding] = []
    if any(_hidden(c) for c in name) or not name.isprintable():
        found.append(Finding("hidden_characters", "name", _excerpt(name, 0, len(name))))
    texts: list[tuple[str, str]] = []
    for key in ("description", "title"):
        if isinstance(tool.get(key), str):
            texts.append((key, tool[key]))
    for key in ("inputSchema", "outputSchema", "annotations"):
        texts.extend(_texts(tool.get(key), key))
    for where, text in texts:
        if len(text) > limit:
            found.append(Finding("long_text", where, f"{len(text)} characters (limit {limit})"))
        found.extend(scan_text(text, where, names, name))
    return found
