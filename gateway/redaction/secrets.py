"""Recognizers Presidio does not ship: credentials (entity `SECRET`) and disguised card numbers.

Token formats with a fixed prefix (AWS, GitHub, GitLab, Slack, Stripe, JWT, PEM) are matched
exactly. Where a secret sits inside something that must keep working as text (the password of
a connection string, the value of `api_key=...`), the pattern matches only the secret, using
a named group `v`, so `postgres://app:<SECRET>@db/prod` keeps its
shape. A long random-looking token with no prefix counts as a secret when its Shannon entropy is
high and it mixes upper case, lower case and digits (hex digests and UUIDs do not).

Presidio's own card recognizer accepts only single spaces or dashes between groups; agents (and
attackers) also write `4111.1111.1111.1111` or `4 1 1 1 ...`. `separated_card_recognizer` accepts
any short run of separators and keeps a match only when the digits pass the Luhn check and
start like a card number.

Cost. A scan is linear in the text, so that an agent cannot stall the gateway with a crafted
argument. Repetitions after a keyword are bounded or possessive, and two repetitions never sit
side by side where both can take the same characters (optional spaces, an optional `=`,
optional spaces again: a run of spaces with no value after it is tried in quadratically many
splits). A run is not rescanned from each of its positions: a pattern that spans a whole run
starts only where the run starts (a lookbehind), a JWT whose first segment fails is not tried
again from a later `eyJ` of the same run (`(*SKIP)`: it would end where the first did), and the
name of an AWS secret is read up to the next `aws` only. The patterns run in the `regex`
module, which releases the GIL while it matches: a large argument scanned in a worker thread
leaves the event loop free.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import regex  # type: ignore[import-untyped]
from presidio_analyzer import EntityRecognizer, RecognizerResult

__all__ = [
    "SECRET",
    "RegexRecognizer",
    "Validator",
    "entropy",
    "high_entropy_recognizer",
    "luhn_ok",
    "secret_recognizer",
    "separated_card_recognizer",
]

SECRET = "SECRET"  # noqa: S105 - an entity type name

Validator = Callable[[str], bool]


class RegexRecognizer(EntityRecognizer):
    """A Presidio recognizer over plain regex patterns, guarded by one cheap prefilter.

    Presidio's `PatternRecognizer` runs each pattern with per-match bookkeeping and reports the
    whole match; this one reports the named group `v` when the pattern has one (the secret, not
    the `password=` before it), and skips text the prefilter rules out in one C-level search.
    """

    def __init__(
        self,
        entity: str,
        name: str,
        prefilter: str,
        patterns: list[tuple[str, str, float, Validator | None]],
    ) -> None:
        self._prefilter = regex.compile(prefilter)
        self._patterns = [(n, regex.compile(rx), score, check) for n, rx, score, check in patterns]
        super().__init__(supported_entities=[entity], name=name)

    def load(self) -> None:
        return None

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[RecognizerResult]:
        if not self._prefilter.search(text):
            return []
        entity = self.supported_entities[0]
        out: list[RecognizerResult] = []
        for _name, rx, score, check in self._patterns:
            for m in rx.finditer(text):
                start, end = m.span("v") if "v" in rx.groupindex else m.span()
                if start < end and (check is None or check(text[start:end])):
                    out.append(RecognizerResult(entity, start, end, score))
        return out


_TOKENS: list[tuple[str, str, float, Validator | None]] = [
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


def secret_recognizer() -> RegexRecognizer:
    """Credentials in a known format: exact, so every match counts."""
    return RegexRecognizer(SECRET, "SecretRecognizer", _FORMAT_HINTS, _TOKENS)


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


def high_entropy_recognizer() -> RegexRecognizer:
    """API keys without a known prefix: after `api_key=`-like names, or long random tokens alone."""
    keyed = (
        r"(?i:api[_-]?key|apikey|secret(?:[_-]?key)?|client[_-]?secret|access[_-]?token|auth[_-]?token"
        r"|bearer|token|private[_-]?key)[\"']?(?:\s*+[=:])?\s*+[\"']?"
        r"(?P<v>[A-Za-z0-9_\-+/.~][A-Za-z0-9_\-+/=.~]{15,511})"
    )
    standalone = r"(?<![A-Za-z0-9_\-+/=.])[A-Za-z0-9_\-+/]{32,}={0,2}(?![A-Za-z0-9_\-+/=.])"
    return RegexRecognizer(
        SECRET,
        "high_entropy_recognizer",
        r"[A-Za-z0-9_\-+/.~]{16}",
        [("keyed_value", keyed, 0.7, _keyed_value), ("random_token", standalone, 0.6, _random_token)],
    )


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(text: str) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    if not 13 <= len(digits) <= 19 or not luhn_ok(digits):
        return False
    return digits[0] in "3456" or (digits[0] == "2" and 2221 <= int(digits[:4]) <= 2720)


def separated_card_recognizer() -> RegexRecognizer:
    """Card numbers whose digits are split by any short run of separators (Luhn-checked)."""
    rx = r"(?<!\d)\d(?:[ \t\-._/\\|,*]{0,3}\d){12,18}(?!\d)"
    patterns: list[tuple[str, str, float, Validator | None]] = [("separated_card", rx, 0.9, _card)]
    return RegexRecognizer("CREDIT_CARD", "SeparatedCardRecognizer", r"\d", patterns)
