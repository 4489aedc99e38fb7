"""The detectors' pattern data, free of Presidio: regexes, their validators, and the loop that runs them.

Two users: the Presidio recognizers of the configured redaction (`secrets`, `linear`, imported only
when `redaction:` is configured) and the built-in detectors of the audit view (`basic`, imported
by every gateway). Importing this module costs a few regex compilations and no third-party
import but `regex`.

Every pattern is linear in its text (`gateway.redaction.secrets` says how).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import regex  # type: ignore[import-untyped]

__all__ = [
    "EMAIL",
    "SECRET",
    "SECRET_ENTROPY",
    "SECRET_FORMATS",
    "SECRET_GATE",
    "SEPARATED_CARD",
    "Patterns",
    "Rule",
    "Validator",
    "card_like",
    "entropy",
    "luhn_ok",
]

SECRET = "SECRET"  # noqa: S105 - an entity type name

Validator = Callable[[str], bool]
Rule = tuple[str, str, float, Validator | None]
"""A pattern: its name, the regex, the score it gives, and a check of the matched text (or None)."""


class Patterns:
    """Regexes for one entity, guarded by one cheap prefilter.

    `spans` reports the named group `v` when a pattern has one (the secret, not the `password=`
    before it), and skips text the prefilter rules out in one C-level search. `engine`: the
    `regex` module, which releases the GIL while it matches (the configured redaction scans large
    text in a worker thread), or `re`, several times faster on short text but holding the GIL."""

    def __init__(self, prefilter: str, rules: list[Rule], engine: Any = regex) -> None:
        self._prefilter = engine.compile(prefilter)
        self._rules = [(engine.compile(rx), score, check) for _name, rx, score, check in rules]

    def spans(self, text: str) -> Iterator[tuple[int, int, float]]:
        """(start, end, score) of every match that passes its check."""
        if not self._prefilter.search(text):
            return
        for rx, score, check in self._rules:
            has_value = "v" in rx.groupindex
            for m in rx.finditer(text):
                start, end = m.span("v") if has_value else m.span()
                if start < end and (check is None or check(text[start:end])):
                    yield start, end, score


# -- secrets (entity SECRET) -------------------------------------------------------------------

_TOKENS: list[Rule] = [
    ("aws_access_key_id", r"\b(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z2-7]{16}\b", 1.0, None),
    (
        "aws_secret_access_key",
        r"(?i:aws)(?:(?!(?i:aws))[\w.-]){0,30}(?i:secret|key)[\w\"']{0,20}+\s*+[:=]\s*+[\"']?"
        r"(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])",
        1.0,
        None,
    ),
    ("github_token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b", 1.0, None),
    ("gitlab_token", r"\bgl(?:pat|dt|rt|ptt|ft|cbt|oas|soat)-[A-Za-z0-9_-]{20,}", 1.0, None),
    ("slack_token", r"\bxox[abposre]-[A-Za-z0-9-]{10,}", 1.0, None),
    ("slack_webhook", r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9_/]{20,}", 1.0, None),
    ("stripe_key", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}|\bwhsec_[A-Za-z0-9]{24,}", 1.0, None),
    (
        "jwt",
        r"\beyJ[A-Za-z0-9_-]{5,}+(*SKIP)\.eyJ[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]*+",
        1.0,
        None,
    ),
    (
        "pem_private_key",
        r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[A-Za-z0-9+/=\s:,\\]|-(?!----END))*+(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----)?",
        1.0,
        None,
    ),
    ("connection_string_password", r"://[^\s:/@\"'<>]{0,256}:(?P<v>[^\s@/\"'<>]{1,256})@", 1.0, None),
    (
        "password_assignment",
        r"(?i:\b(?:password|passwd|pwd|pass))\s*+(?:[\"']\s*+)?[=:]\s*+[\"']?"
        r"(?P<v>[^\s\"';,&<>]{4,256})",
        0.8,
        None,
    ),
]
_FORMAT_HINTS = (
    r"AKIA|ASIA|ABIA|ACCA|A3T|(?i:aws)|gh[pousr]_|github_pat_|gl(?:pat|dt|rt|ptt|ft|cbt|oas|soat)-|xox"
    r"|hooks\.slack|_live_|_test_|whsec_|eyJ|PRIVATE KEY|://|(?i:pass|pwd)"
)
SECRET_FORMATS: tuple[str, list[Rule]] = (_FORMAT_HINTS, _TOKENS)
"""Credentials in a known format (prefilter, rules): exact, so every match counts."""


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values()) if n else 0.0


def _classes(token: str) -> int:
    return sum(
        (
            any(c.islower() for c in token),
            any(c.isupper() for c in token),
            any(c.isdigit() for c in token),
        )
    )


def _random_token(token: str) -> bool:
    token = token.rstrip("=")
    return len(token) <= 128 and _classes(token) == 3 and entropy(token) >= 4.0


def _keyed_value(token: str) -> bool:
    return _classes(token) >= 2 and entropy(token) >= 3.0


_KEYED = (
    r"(?i:api[_-]?key|apikey|secret(?:[_-]?key)?|client[_-]?secret|access[_-]?token|auth[_-]?token"
    r"|bearer|token|private[_-]?key)[\"']?(?:\s*+[=:])?\s*+[\"']?"
    r"(?P<v>[A-Za-z0-9_\-+/.~][A-Za-z0-9_\-+/=.~]{15,511})"
)
_STANDALONE = r"(?<![A-Za-z0-9_\-+/=.])[A-Za-z0-9_\-+/]{32,}={0,2}(?![A-Za-z0-9_\-+/=.])"
SECRET_ENTROPY: tuple[str, list[Rule]] = (
    r"[A-Za-z0-9_\-+/.~]{16}",
    [("keyed_value", _KEYED, 0.7, _keyed_value), ("random_token", _STANDALONE, 0.6, _random_token)],
)
"""API keys without a known prefix: after `api_key=`-like names, or long random tokens alone."""
SECRET_GATE = r"[A-Za-z0-9_\-+/=.~]{16}|xox|PRIVATE KEY|://|(?i:pass|pwd)"  # noqa: S105 - a pattern
"""What every secret rule's match holds: a run of 16 token characters (all formats but four are
longer), or the mark of one of those four (a short Slack token, a PEM header, a connection
string's password, a `password=`). Text without any cannot hold a secret."""


# -- card numbers (entity CREDIT_CARD) ---------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_like(text: str) -> bool:
    """13 to 19 digits (separators ignored) that pass the Luhn check and start like a card number."""
    digits = "".join(c for c in text if c.isdigit())
    if not 13 <= len(digits) <= 19 or not luhn_ok(digits):
        return False
    return digits[0] in "3456" or (digits[0] == "2" and 2221 <= int(digits[:4]) <= 2720)


SEPARATED_CARD: tuple[str, list[Rule]] = (
    r"\d",
    [("separated_card", r"(?<!\d)\d(?:[ \t\-._/\\|,*]{0,3}\d){12,18}(?!\d)", 0.9, card_like)],
)
"""Card numbers whose digits are split by any short run of separators (or none), Luhn-checked."""


# -- e-mail (entity EMAIL_ADDRESS) -------------------------------------------------------------

EMAIL = (
    r"(?:[!#$%&'*+\-/=?^_`{|}~\w]|[!#$%&'*+\-/=?^_`{|}~\w][!#$%&'*+\-/=?^_`{|}~.\w]{0,62}"
    r"[!#$%&'*+\-/=?^_`{|}~\w])@(*SKIP)(?>\w+(?:-+\w+)*(?:\.\w+(?:-+\w+)*)+)\b"
)
"""Presidio's e-mail pattern with the local part bounded (`gateway.redaction.linear` says why)."""
