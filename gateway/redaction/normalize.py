"""Evasion hardening: undo the disguises that make a value slip past pattern recognizers.

`normalize` folds a string to the form the recognizers expect: invisible characters (zero-width,
bidi controls, soft hyphen) removed, then Unicode NFKC, which turns full-width digits and
letters, circled or superscript forms and compatibility characters into ASCII. Pure-ASCII
strings (almost every string) skip both steps.

`encoded_spans` finds substrings that look base64-, hex- or URL-encoded and decodes them; the
scanner scans the decoded text (to a bounded depth) and treats the whole encoded substring as
the finding when the decoded text holds one. Decoded text that is not mostly printable UTF-8 is
ignored, so arbitrary identifiers and binary blobs cost one failed decode.

Both searches are linear in the text: each starts only where a run of its characters starts (a
lookbehind) and takes the whole run without backtracking.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from collections.abc import Iterator
from typing import NamedTuple
from urllib.parse import unquote_plus

import regex  # type: ignore[import-untyped]

__all__ = ["Encoded", "encoded_spans", "normalize"]

_INVISIBLE = dict.fromkeys(
    [
        0x00AD,  # soft hyphen
        0x034F,  # combining grapheme joiner
        0x061C,  # arabic letter mark
        0x115F,
        0x1160,
        0x17B4,
        0x17B5,
        0x180E,  # mongolian vowel separator
        *range(0x200B, 0x2010),  # zero-width space/joiners, LRM, RLM
        *range(0x202A, 0x202F),  # bidi embeddings and overrides
        *range(0x2060, 0x2065),  # word joiner, invisible operators
        *range(0x2066, 0x206A),  # bidi isolates
        0x3164,
        0xFEFF,  # zero-width no-break space / BOM
        0xFFA0,
    ]
)

_B64 = regex.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{16,}+={0,2}")
_HEX = regex.compile(r"^(?:[0-9a-fA-F]{2}){8,}$")
_PCT = regex.compile(r"%[0-9A-Fa-f]{2}")
_URLISH = regex.compile(r"(?<![^\s\"'<>])[^\s\"'<>%]*+%[^\s\"'<>]*+")


def normalize(text: str) -> str:
    """`text` without invisible characters, in NFKC; ASCII text is returned as is."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFKC", text.translate(_INVISIBLE))


class Encoded(NamedTuple):
    start: int
    end: int
    decoded: str
    scheme: str


def _printable(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    good = sum(1 for c in text if c.isprintable() or c in "\n\r\t")
    return text if good >= 0.9 * len(text) else None


def _b64(token: str) -> str | None:
    body = token.rstrip("=")
    if len(body) % 4 == 1:
        return None
    padded = body + "=" * (-len(body) % 4)
    try:
        if "-" in body or "_" in body:
            data = base64.urlsafe_b64decode(padded)
        else:
            data = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable(data)


def encoded_spans(text: str, max_bytes: int) -> Iterator[Encoded]:
    """Encoded substrings of `text` whose decoded form is printable text, at most `max_bytes` each."""
    if "%" in text:
        for m in _URLISH.finditer(text):
            token = m.group(0)
            if len(token) <= max_bytes and _PCT.search(token):
                decoded = unquote_plus(token)
                if decoded != token:
                    yield Encoded(m.start(), m.end(), decoded, "url")
    for m in _B64.finditer(text):
        token = m.group(0)
        if len(token) > max_bytes:
            continue
        if _HEX.match(token):
            hex_text = _printable(bytes.fromhex(token))
            if hex_text is not None:
                yield Encoded(m.start(), m.end(), hex_text, "hex")
                continue
        b64_text = _b64(token)
        if b64_text is not None:
            yield Encoded(m.start(), m.end(), b64_text, "base64")
