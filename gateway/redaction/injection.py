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
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from gateway.redaction.normalize import normalize

__all__ = ["Finding", "scan_text", "scan_tool"]

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


_OVERRIDE = re.compile(
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}?\b(?:previous|prior|above|earlier|preceding"
    r"|all|any|other|system|your|the)\b[^.\n]{0,20}?\b(?:instructions?|prompts?|rules|directions|guidelines"
    r"|guardrails|polic(?:y|ies))\b"
    r"|\b(?:do\s+not|don'?t|never)\s+(?:tell|inform|mention|reveal|show|alert|notify)\b[^.\n]{0,20}?\buser\b"
    r"|\bwithout\s+(?:telling|informing|notifying|alerting|asking)\s+the\s+user\b"
    r"|\bthe\s+user\s+(?:must|should)\s+(?:not|never)\s+(?:know|see|be\s+told)\b"
    r"|<\s*/?\s*(?:important|system|instructions?|secret|hidden)\s*>"
    r"|\[\s*(?:system|inst)\s*\]"
    r"|\b(?:system\s+prompt|new\s+instructions\s*:|you\s+are\s+now\b|from\s+now\s+on\b)",
    re.IGNORECASE,
)
_CALL_OTHER = re.compile(
    r"\b(?:call|use|invoke|run|execute|prefer|instead\s+of|before\s+(?:using|calling)|after\s+(?:using|calling))"
    r"\s+(?:the\s+|any\s+|every\s+)?(?:other\s+)?[`'\"]?([A-Za-z0-9_.-]+)[`'\"]?\s+(?:tool|function)s?\b",
    re.IGNORECASE,
)
_SECRET = re.compile(
    r"~/\.ssh|\bid_(?:rsa|ed25519|ecdsa)\b|(?<![\w.])\.env\b|\.aws/credentials|\.netrc\b|\bmcp\.json\b"
    r"|\bapi[ _-]?keys?\b|\bprivate[ _-]?keys?\b|\bpasswords?\b|\bpassphrases?\b|\bcredentials?\b"
    r"|\bsecret(?:s|[ _-]?keys?)?\b|\b(?:access|bearer|session|refresh)[ _-]?tokens?\b"
    r"|\bseed[ _-]?phrases?\b",
    re.IGNORECASE,
)


def _excerpt(text: str, start: int, end: int) -> str:
    lo = max(0, start - 20)
    snippet = text[lo : min(len(text), end + 20)]
    snippet = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in snippet)
    return snippet[:_EXCERPT]


def scan_text(
    text: str,
    where: str,
    other_tools: Iterable[str] = (),
    self_name: str = "",
    kinds: frozenset[str] | None = None,
) -> list[Finding]:
    """Findings in one piece of text; `other_tools` are names whose mention is suspicious.

    `kinds`: run only these detectors (None: all). Results need only two of them, and the
    others are the costly part of a scan."""
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
    plain = re.sub(r"\s+", " ", plain)
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
        for name in other_tools:
            if name.lower() == own or not _distinctive(name):
                continue
            m2 = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", plain)
            if m2:
                found.append(Finding("tool_reference", where, _excerpt(plain, m2.start(), m2.end())))
                break
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
    others = [n for n in other_tools if n != name]
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
        if len(text) > max_chars:
            found.append(Finding("long_text", where, f"{len(text)} characters (limit {max_chars})"))
        found.extend(scan_text(text, where, others, name))
    return found
