"""Stand-ins for the Presidio recognizers whose own patterns are too slow on crafted text.

Measured through the scanner: Presidio's e-mail pattern lets a local part run unbounded
before the `@` and starts at every word boundary inside it, so each run of `a-a-a-...` costs the
square of its length (64 KB of such runs took 5 s); its URL pattern tries some 400 top-level
domains at every dot of a 253-character stretch from every position (64 KB of `a.a.a...` ran
into Presidio's 60 s regex timeout). The stand-ins find the same things in time linear in the
text:

- e-mail: Presidio's pattern and validation, with the local part bounded to 64 characters (the
  RFC 5321 limit) and the domain matched atomically. The local part may start anywhere, not
  only at a word boundary, so a longer run before the `@` is matched by its last 64 characters
  rather than missed (a prefix would otherwise hide an address). When the domain after an `@`
  fails, the search resumes after that `@` (`(*SKIP)`): the domain does not depend on where the
  local part starts, so every other start before it would fail the same way;
- URL: a host of dot-separated labels, with or without `http(s)://`, that starts where a run of
  host characters starts and whose last label is one of the top-level domains Presidio knows
  (read from its pattern, so the two lists stay the same).
"""

from __future__ import annotations

import regex  # type: ignore[import-untyped]
from presidio_analyzer import Pattern
from presidio_analyzer.predefined_recognizers import EmailRecognizer, UrlRecognizer

from gateway.redaction.patterns import EMAIL
from gateway.redaction.secrets import RegexRecognizer, Validator

__all__ = ["EMAIL", "email_recognizer", "url_recognizer"]

_HOST = r"(?:[a-z0-9-]{1,63}\.){1,126}[a-z]{2,63}(?:/[^\s()<>\"']*+)?"


def email_recognizer() -> EmailRecognizer:
    """Presidio's e-mail recognizer (and its domain check) over the bounded pattern."""
    return EmailRecognizer(patterns=[Pattern("Email (Medium)", EMAIL, 0.5)])


def url_recognizer() -> RegexRecognizer:
    """URLs, with a scheme (score 0.6, as Presidio's) or without (0.5)."""
    tlds = frozenset(regex.findall(r"\(\?:([a-z]+)\)", UrlRecognizer.BASE_URL_REGEX))
    if len(tlds) < 100:
        raise RuntimeError("Presidio's URL pattern changed: its top-level domains cannot be read")

    def known_tld(url: str) -> bool:
        host = url.split("://", 1)[-1].split("/", 1)[0]
        return host.rsplit(".", 1)[-1].lower() in tlds

    patterns: list[tuple[str, str, float, Validator | None]] = [
        ("url", r"(?i)\bhttps?://" + _HOST, 0.6, known_tld),
        ("url_no_scheme", r"(?i)(?<![a-z0-9.\-/])" + _HOST, 0.5, known_tld),
    ]
    return RegexRecognizer("URL", "UrlRecognizer", r"\.", patterns)
