"""Presidio, set up once at start-up to run offline and cheaply.

Importing this module imports Presidio (about 0.7 s), so only a gateway with `redaction:`
configured imports it. The analyzer uses `NoOpNlpEngine` and pattern recognizers, restricted to
the configured entity types; a spaCy model is loaded only when `redaction.ner_model` is set and
an NER entity type (PERSON, LOCATION, ...) is listed, and a missing model stops start-up.

Speed. Presidio's phone recognizer costs about 16 µs per character, so scanning whole strings
would make a 1 MB result take seconds. `Scanner.find` first runs one cheap candidate regex (an
`@`, a run of digits, an IPv6 colon pair: a superset of what the built-in recognizers can match)
and hands Presidio only windows around the candidates, widened by `_MARGIN` characters so
context words and letter prefixes (IBAN country codes) are included. Strings with no
candidate cost one regex search. Secret and card recognizers run on the whole text (plain
regexes). NER, which has no cheap candidate, analyses whole strings.

Every pattern recognizer is linear in its text: Presidio's own are, except e-mail and URL, which
`gateway.redaction.linear` replaces, and Bastion's are written to be (`gateway.redaction.secrets`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")  # no download of the suffix list

import regex  # type: ignore[import-untyped]
from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry, RecognizerResult
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
from presidio_analyzer.nlp_engine import NlpArtifacts, NoOpNlpEngine, SpacyNlpEngine
from presidio_analyzer.predefined_recognizers import (
    EmailRecognizer,
    PhoneRecognizer,
    SpacyRecognizer,
    UrlRecognizer,
)

from gateway.config import RedactionConfig
from gateway.errors import ConfigError
from gateway.redaction.linear import email_recognizer, url_recognizer
from gateway.redaction.normalize import encoded_spans, normalize
from gateway.redaction.secrets import (
    SECRET,
    RegexRecognizer,
    high_entropy_recognizer,
    secret_recognizer,
    separated_card_recognizer,
)

__all__ = ["NER_ENTITIES", "Finding", "Scanner", "build_scanner"]

NER_ENTITIES = frozenset({"PERSON", "LOCATION", "NRP", "ORGANIZATION"})
MIN_LEN = 6
"""No recognizer matches fewer characters (`a@b.io`, `1.2.3.4` are longer): shorter strings are skipped."""
MAX_DEPTH = 2
"""Encodings unwrapped inside each other at most (base64 of URL-encoded text is depth 2)."""
_MARGIN = 64
_DIGITS = r"\d[\d\s().\-/]{4,}\d"
_CANDIDATES: dict[str, str] = {
    "EMAIL_ADDRESS": r"@",
    "PHONE_NUMBER": _DIGITS,
    "CREDIT_CARD": _DIGITS,
    "US_SSN": _DIGITS,
    "IBAN_CODE": _DIGITS,
    "US_BANK_NUMBER": _DIGITS,
    "US_ITIN": _DIGITS,
    "UK_NHS": _DIGITS,
    "IP_ADDRESS": _DIGITS + r"|:[0-9A-Fa-f]{0,4}:",
}
_SAMPLE = (
    "mail jane.roe@example.org, call +1 415-555-0132, card 4111 1111 1111 1111, ssn 219-09-9999, "
    "iban DE89370400440532013000, ip 192.168.10.20, key AKIAIOSFODNN7EXAMPLE"
)


@dataclass(frozen=True, slots=True)
class Finding:
    """A span of a normalised string that holds `entity`; `counted` lists every type it stands for
    (several when it is an encoded string whose decoded text held more than one)."""

    start: int
    end: int
    entity: str
    score: float
    counted: tuple[str, ...]
    decoded: bool = False


class Scanner:
    """Finds entities in one string: normalised, decoded, windowed. Thread-safe (no mutable state)."""

    def __init__(
        self,
        entities: Iterable[str],
        patterns: AnalyzerEngine | None,
        windowed: frozenset[str],
        whole: frozenset[str],
        ner: AnalyzerEngine | None,
        ner_entities: frozenset[str],
        extra: list[tuple[RegexRecognizer, str]],
        threshold: float,
        decode_limit: int,
    ) -> None:
        self.entities = frozenset(entities)
        self._patterns = patterns
        self._windowed = sorted(windowed)
        self._whole = sorted(whole)
        self._ner = ner
        self._ner_entities = sorted(ner_entities)
        self._extra = extra
        self._threshold = threshold
        self._decode_limit = decode_limit
        alternatives = sorted({_CANDIDATES[e] for e in windowed})
        self._candidates = regex.compile("|".join(alternatives)) if alternatives else None

    def find(self, text: str) -> tuple[str, list[Finding]]:
        """The normalised text and the findings in it (non-overlapping, in order)."""
        norm = normalize(text)
        if len(norm) < MIN_LEN:
            return norm, []
        return norm, self._find(norm, 0)

    def _find(self, text: str, depth: int) -> list[Finding]:
        found: list[Finding] = []
        if self._patterns is not None:
            if self._whole:
                found += self._analyze(self._patterns, text, 0, self._whole)
            if self._candidates is not None:
                for lo, hi in self._windows(text):
                    found += self._analyze(self._patterns, text[lo:hi], lo, self._windowed)
        for recognizer, entity in self._extra:
            for r in recognizer.analyze(text, [entity], None):
                if r.score >= self._threshold:
                    found.append(Finding(r.start, r.end, entity, r.score, (entity,)))
        if self._ner is not None:
            found += self._analyze(self._ner, text, 0, self._ner_entities)
        if depth < MAX_DEPTH:
            for enc in encoded_spans(text, self._decode_limit):
                inner = self._find(normalize(enc.decoded), depth + 1)
                if inner:
                    best = max(inner, key=lambda f: f.score)
                    counted = tuple(t for f in inner for t in f.counted)
                    found.append(Finding(enc.start, enc.end, best.entity, best.score, counted, True))
        return _resolve(found)

    def _analyze(self, engine: AnalyzerEngine, text: str, offset: int, entities: list[str]) -> list[Finding]:
        results = engine.analyze(text, language="en", entities=entities, score_threshold=self._threshold)
        return [
            Finding(r.start + offset, r.end + offset, r.entity_type, r.score, (r.entity_type,))
            for r in results
        ]

    def _windows(self, text: str) -> list[tuple[int, int]]:
        assert self._candidates is not None
        n = len(text)
        raw: list[tuple[int, int]] = []
        for m in self._candidates.finditer(text):
            # an `@` stands for an address around it: up to 64 characters before, 255 after
            at = m.group() == "@"
            lo = max(0, m.start() - _MARGIN - (64 if at else 0))
            raw.append((lo, min(n, m.end() + _MARGIN + (255 if at else 0))))
        # Merged before their edges move to whitespace (a loop per edge), so text dense with
        # candidates pays for one window, not for each candidate.
        return _merge_spans((_to_space(text, lo, -1), _to_space(text, hi, 1)) for lo, hi in _merge_spans(raw))


def _merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans in order of start, overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


class _NoContext(ContextAwareEnhancer):
    """Presidio's default enhancer looks for context words among NLP tokens, which `NoOpNlpEngine`
    does not produce: it finds none, after deep-copying every result, which is most of the cost
    of text dense with matches (a megabyte of `A1 ` took 24 s)."""

    def __init__(self) -> None:
        super().__init__(0.0, 0.0, 0, 0)

    def enhance_using_context(
        self,
        text: str,
        raw_results: list[RecognizerResult],
        nlp_artifacts: NlpArtifacts,
        recognizers: list[EntityRecognizer],
        context: list[str] | None = None,
    ) -> list[RecognizerResult]:
        return raw_results


def _to_space(text: str, i: int, step: int) -> int:
    """Move a window edge outwards to a whitespace boundary, at most `_MARGIN` characters."""
    n = len(text)
    for _ in range(_MARGIN):
        if i <= 0 or i >= n or text[i - 1 if step < 0 else i].isspace():
            break
        i += step
    return max(0, min(n, i))


def _resolve(found: list[Finding]) -> list[Finding]:
    """Overlapping findings become one, spanning them all, named after the most certain one."""
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (f.start, -f.end))
    out: list[Finding] = []
    group = [found[0]]
    end = found[0].end
    for f in found[1:]:
        if f.start < end:
            group.append(f)
            end = max(end, f.end)
            continue
        out.append(_merge(group, end))
        group, end = [f], f.end
    out.append(_merge(group, end))
    return out


def _merge(group: list[Finding], end: int) -> Finding:
    if len(group) == 1:
        return group[0]
    best = max(group, key=lambda f: (f.decoded, f.score, f.end - f.start))
    return Finding(group[0].start, end, best.entity, best.score, best.counted, best.decoded)


def build_scanner(cfg: RedactionConfig) -> Scanner:
    """Build the analyzer once; a problem (unknown entity type, missing NER model) is a ConfigError."""
    wanted = set(cfg.entities)
    nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no_op"}])
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"], nlp_engine=nlp)
    recognizers: list[EntityRecognizer] = []
    provided: set[str] = set()
    for r in registry.recognizers:
        if isinstance(r, SpacyRecognizer | UrlRecognizer):
            continue
        if isinstance(r, PhoneRecognizer):
            r = PhoneRecognizer(supported_regions=tuple(cfg.phone_regions))
        if isinstance(r, EmailRecognizer):
            r = email_recognizer()
        ents = set(r.supported_entities) & wanted
        if ents:
            recognizers.append(r)
            provided |= ents
    extra: list[tuple[RegexRecognizer, str]] = []
    if SECRET in wanted:
        extra += [(secret_recognizer(), SECRET), (high_entropy_recognizer(), SECRET)]
        provided.add(SECRET)
    if "CREDIT_CARD" in wanted:
        extra.append((separated_card_recognizer(), "CREDIT_CARD"))
    if "URL" in wanted:
        extra.append((url_recognizer(), "URL"))
        provided.add("URL")
    ner_entities = frozenset(wanted & NER_ENTITIES)
    ner = _ner_engine(cfg, ner_entities) if ner_entities else None
    provided |= ner_entities
    if unknown := sorted(wanted - provided):
        known = sorted({e for r in registry.recognizers for e in r.supported_entities} | {SECRET})
        raise ConfigError(
            f"redaction.entities: no recognizer for {', '.join(unknown)}; known: {', '.join(known)}"
        )
    patterns: AnalyzerEngine | None = None
    if recognizers:
        reg = RecognizerRegistry(supported_languages=["en"])
        for r in recognizers:
            reg.add_recognizer(r)
        patterns = AnalyzerEngine(
            nlp_engine=nlp, registry=reg, supported_languages=["en"], context_aware_enhancer=_NoContext()
        )
    builtin = provided - ner_entities - {SECRET}
    windowed = frozenset(e for e in builtin if e in _CANDIDATES)
    scanner = Scanner(
        wanted,
        patterns,
        windowed,
        frozenset(builtin - windowed),
        ner,
        ner_entities,
        extra,
        cfg.score_threshold,
        cfg.scan_limit_bytes,
    )
    scanner.find(_SAMPLE)  # compiles every recognizer's regexes now, not on the first call
    return scanner


def _ner_engine(cfg: RedactionConfig, entities: frozenset[str]) -> AnalyzerEngine:
    names = ", ".join(sorted(entities))
    model = cfg.ner_model
    if model is None:
        raise ConfigError(
            f"redaction.entities: {names} need a named-entity model: set redaction.ner_model to an "
            "installed spaCy model (e.g. en_core_web_sm), or remove them"
        )
    if importlib.util.find_spec(model) is None:
        raise ConfigError(
            f"redaction.ner_model: the spaCy model {model!r} is not installed in this environment "
            f"(needed for {names}); install it or remove the NER entity types"
        )
    try:
        nlp: Any = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])
        nlp.load()
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"redaction.ner_model: cannot load spaCy model {model!r}: {exc}") from exc
    reg = RecognizerRegistry(supported_languages=["en"])
    reg.add_recognizer(SpacyRecognizer(supported_entities=sorted(entities)))
    return AnalyzerEngine(nlp_engine=nlp, registry=reg, supported_languages=["en"])
