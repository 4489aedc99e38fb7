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

The patterns themselves are in `gateway.redaction.patterns`, free of Presidio, which the
audit record's built-in detectors (`gateway.redaction.basic`) use too.

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

from typing import Any

from presidio_analyzer import EntityRecognizer, RecognizerResult

from gateway.redaction.patterns import (
    SECRET,
    SECRET_ENTROPY,
    SECRET_FORMATS,
    SEPARATED_CARD,
    Patterns,
    Rule,
    Validator,
    entropy,
    luhn_ok,
)

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


class RegexRecognizer(EntityRecognizer):
    """A Presidio recognizer over plain regex patterns, guarded by one cheap prefilter.

    Presidio's `PatternRecognizer` runs each pattern with per-match bookkeeping and reports the
    whole match; this one reports the named group `v` when the pattern has one (the secret, not
    the `password=` before it), and skips text the prefilter rules out in one C-level search
    (`gateway.redaction.patterns.Patterns`, which the audit view's detectors share).
    """

    def __init__(self, entity: str, name: str, prefilter: str, patterns: list[Rule]) -> None:
        self._patterns = Patterns(prefilter, patterns)
        super().__init__(supported_entities=[entity], name=name)

    def load(self) -> None:
        return None

    def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[RecognizerResult]:
        entity = self.supported_entities[0]
        return [
            RecognizerResult(entity, start, end, score) for start, end, score in self._patterns.spans(text)
        ]


def secret_recognizer() -> RegexRecognizer:
    """Credentials in a known format: exact, so every match counts."""
    return RegexRecognizer(SECRET, "SecretRecognizer", *SECRET_FORMATS)


def high_entropy_recognizer() -> RegexRecognizer:
    """API keys without a known prefix: after `api_key=`-like names, or long random tokens alone."""
    return RegexRecognizer(SECRET, "high_entropy_recognizer", *SECRET_ENTROPY)


def separated_card_recognizer() -> RegexRecognizer:
    """Card numbers whose digits are split by any short run of separators (Luhn-checked)."""
    return RegexRecognizer("CREDIT_CARD", "SeparatedCardRecognizer", *SEPARATED_CARD)
