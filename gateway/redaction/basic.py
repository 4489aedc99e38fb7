"""Built-in detectors for the audit record's view of the arguments, without Presidio.

With `audit.arguments: redacted` (the default) and no `redaction:` configured, the record keeps
the argument values with what these detectors find replaced by `<ENTITY>`, the placeholders of
the configured redaction's audit view. Only the record's copy changes: the call is forwarded as
it came, and Cedar's `context.pii` stays empty (that needs `redaction:`). Presidio (about 2 s of
import and 67 MB) is never imported here; the patterns come from `gateway.redaction.patterns`,
shared with the configured redaction's recognizers.

Entities, in order of precedence where two findings overlap (they become one, spanning both):

- `SECRET`: the credential formats and the high-entropy rule of the configured redaction, and
  every string under a key named like a credential (`password`, `api_key`, `accessToken`, ...);
- `CREDIT_CARD`: 13 to 19 digits, split by any short run of separators or none, passing the Luhn
  check and starting like a card number;
- `IBAN_CODE`: a country of the IBAN registry, check digits and groups of four (spaced, dashed or
  not), passing the mod-97 check; a match that fails is retried without its trailing groups;
- `US_SSN`: `219-09-9999` (one separator, `-`, space or `.`, used twice), with no 000, 666 or
  9xx area, no 00 group, no 0000 serial, and not one digit repeated;
- `UK_NINO`: `AB 12 34 56 C` in capitals, without the prefixes that are never allocated;
- `EMAIL_ADDRESS`: the configured redaction's bounded pattern, with a top-level domain of letters;
- `PHONE_NUMBER`: North American numbers written with separators or parentheses
  (`(415) 555-0132`, `+1 415.555.0132`), and `+<country code>` numbers of 8 to 15 digits.
  Conservative: a bare run of ten digits is more often an id than a phone number and is kept,
  and other countries' national formats (without `+`) are not recognised. (The `phonenumbers`
  package, which Presidio uses, costs 60 to 100 µs per candidate and some 60 µs per character
  of digit-dense text: too much for every call's record.)

What is scanned, as in the configured redaction (docs/redaction.md): string leaves, normalised
first (invisible characters removed, NFKC) and with base64, hex and URL-encoded substrings
decoded (to a depth of 2, the whole encoded substring replaced when its decoded text holds a
finding); integers, and floats with an integral value, of 12 to 19 digits, which become
`<CREDIT_CARD>` when they are card numbers (a card number sent as a JSON number is still one).
Booleans, null, other numbers and keys are kept. Strings shorter than 6 characters cannot hold a
finding and are kept. A string with no finding is kept as it is; one with findings is stored in
its normalised form with the findings replaced.

Cost. At most `SCAN_LIMIT` bytes of text are scanned per record, in document order; a leaf that
would cross it, and every leaf after it, becomes `<unscanned:N>` (N: its length), as in the
configured view. Every pattern is linear in its text (tests/redaction/test_linear_time.py), so
the view of one call costs a bounded amount of CPU (docs/audit.md gives the measured cost).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from gateway.redaction.normalize import encoded_spans, normalize
from gateway.redaction.patterns import (
    EMAIL,
    SECRET,
    SECRET_ENTROPY,
    SECRET_FORMATS,
    SECRET_GATE,
    SEPARATED_CARD,
    Patterns,
    card_like,
)

__all__ = ["ENTITIES", "SCAN_LIMIT", "audit_view", "find", "redact"]

SCAN_LIMIT = 64 * 1024
"""Most bytes of text scanned per record."""
MIN_LEN = 6
"""No detector matches fewer characters (`a@b.io`)."""
MAX_DEPTH = 2
"""Encodings unwrapped inside each other at most (base64 of URL-encoded text is depth 2)."""

ENTITIES = ("SECRET", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "UK_NINO", "EMAIL_ADDRESS", "PHONE_NUMBER")
"""What the detectors find, in order of precedence."""
_RANK = {entity: i for i, entity in enumerate(ENTITIES)}

Span = tuple[int, int, str]
"""A finding: start, end, entity."""


def _ssn(text: str) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return (
        area not in ("000", "666")
        and area[0] != "9"
        and group != "00"
        and serial != "0000"
        and digits.count(digits[0]) != len(digits)
    )


def _email(text: str) -> bool:
    tld = text.rsplit(".", 1)[-1]
    return (len(tld) >= 2 and tld.isalpha()) or tld.lower().startswith("xn--")


_NOT_AFTER = r"(?![\w\-]|\.\d)"
"""A match must not run on into a longer word, number or dotted run."""
_SSN = r"(?<![\w.\-])\d{3}(?P<s>[\- .])\d{2}(?P=s)\d{4}" + _NOT_AFTER
_NINO = r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d\d ?\d\d ?\d\d ?[A-D]\b"
_NORTH_AMERICAN = (
    r"(?<![\w+.\-])(?:\+?1[ .\-]?)?(?:\([2-9]\d\d\)[ .\-]?|[2-9]\d\d[ .\-])[2-9]\d\d[ .\-]\d{4}" + _NOT_AFTER
)
_INTERNATIONAL = r"(?<![\w+])\+[1-9](?:[ .\-()]{0,2}\d){7,14}(?!\d)"
_SECRETS = (Patterns(*SECRET_FORMATS), Patterns(*SECRET_ENTROPY))
_EMAIL_ADDRESSES = Patterns("@", [("email", EMAIL, 1.0, _email)])
_LONG_NUMBERS: list[tuple[str, Patterns]] = [
    ("CREDIT_CARD", Patterns(*SEPARATED_CARD, re)),
    ("US_SSN", Patterns(r"\d", [("ssn", _SSN, 1.0, _ssn)], re)),
    ("PHONE_NUMBER", Patterns(r"\d", [("north_american", _NORTH_AMERICAN, 1.0, None)], re)),
]
_INTERNATIONAL_PHONES = Patterns(r"\+", [("international", _INTERNATIONAL, 1.0, None)], re)
_NINOS = Patterns(r"\d", [("nino", _NINO, 1.0, None)], re)
"""The patterns made of digits run in the stdlib `re`, several times faster than `regex` on short
text (the others need `regex`'s `(*SKIP)`); `regex` releases the GIL while it matches, which does
not matter here: the view is made on the event loop, of at most `SCAN_LIMIT` bytes."""

# Gates: text that cannot hold an entity is not searched for it (most strings pass none).
_SEPARATORS = r"[ \t\-._/\\|,*()]{0,3}"
_SIX_DIGITS = re.compile(rf"\d(?:{_SEPARATORS}\d){{5}}")
"""Six digits apart by at most three separators (of any kind a pattern above allows): what every
entity made of digits holds (a NINO's six, an international phone number's eight or more)."""
_NINE_DIGITS = re.compile(rf"\d(?:{_SEPARATORS}\d){{8}}")
"""What a card number, an SSN and a US phone number hold (a date does not)."""
_SECRET_GATE = re.compile(SECRET_GATE)
"""Also where an encoded substring can be: base64 and hex need a run of 16 token characters."""
_ANYTHING = re.compile("|".join((_SIX_DIGITS.pattern, SECRET_GATE, "@", "%", r"[A-Z]{2}\d\d")))
"""What text must hold for any detector to find something in it."""

_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d\d(?:[ \-]?[A-Z0-9]{4}){2,7}(?:[ \-]?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"
)
_IBAN_COUNTRIES = frozenset(
    re.findall(
        "[A-Z]{2}",
        "AD AE AL AT AZ BA BE BG BH BI BR BY CH CR CY CZ DE DJ DK DO EE EG ES FI FK FO FR GB GE GI GL GR GT "
        "HN HR HU IE IL IQ IS IT JO KW KZ LB LC LI LT LU LV LY MC MD ME MK MN MR MT MU NI NL NO OM PK PL PS "
        "PT QA RO RS RU SA SC SD SE SI SK SM SO ST SV TL TN TR UA VA VG XK YE",
    )
)
"""The countries of the IBAN registry."""


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    """IBANs: of each candidate, the longest prefix that ends at a group and passes mod-97 (one pass
    over the candidate computes the remainder of every such prefix)."""
    for m in _IBAN.finditer(text):
        candidate = m.group()
        if candidate[:2] not in _IBAN_COUNTRIES:
            continue
        head = int("".join(str(int(c, 36)) for c in candidate[:4]))  # moved to the end: 6 digits
        ends: list[tuple[int, int, int]] = []  # (end, remainder of the account part, its length)
        remainder = length = 0
        for i in range(4, len(candidate)):
            c = candidate[i]
            if c in " -":
                ends.append((i, remainder, length))
                continue
            value = int(c, 36)
            remainder = (remainder * (100 if value > 9 else 10) + value) % 97
            length += 1
        ends.append((len(candidate), remainder, length))
        for end, remainder, length in reversed(ends):
            if 11 <= length <= 30 and (remainder * 1_000_000 + head) % 97 == 1:
                yield m.start(), m.start() + end
                break


def find(text: str) -> list[Span]:
    """The findings in `text` (as it is: `redact` normalises first), in order, not overlapping."""
    return _find(text, 0)


def _find(text: str, depth: int) -> list[Span]:
    if not _ANYTHING.search(text):  # most strings: one search
        return []
    found: list[Span] = []
    if _SIX_DIGITS.search(text):
        rules = [("UK_NINO", _NINOS)]
        if _NINE_DIGITS.search(text):
            rules += _LONG_NUMBERS
        if "+" in text:
            rules.append(("PHONE_NUMBER", _INTERNATIONAL_PHONES))
        found += [(start, end, entity) for entity, rule in rules for start, end, _ in rule.spans(text)]
    if len(text) >= 15:
        found += [(start, end, "IBAN_CODE") for start, end in _ibans(text)]
    if "@" in text:
        found += [(start, end, "EMAIL_ADDRESS") for start, end, _ in _EMAIL_ADDRESSES.spans(text)]
    tokens = _SECRET_GATE.search(text) is not None  # also where an encoded substring can be
    if tokens:
        found += [(start, end, SECRET) for rule in _SECRETS for start, end, _ in rule.spans(text)]
    if depth < MAX_DEPTH and (tokens or "%" in text):
        for enc in encoded_spans(text, SCAN_LIMIT):
            if inner := _find(normalize(enc.decoded), depth + 1):
                found.append((enc.start, enc.end, min((e for _, _, e in inner), key=_RANK.__getitem__)))
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (f[0], -f[1]))
    out = [found[0]]
    for start, end, entity in found[1:]:
        last_start, last_end, last_entity = out[-1]
        if start < last_end:  # overlapping: one finding, named after the entity that goes first
            out[-1] = (last_start, max(end, last_end), min(entity, last_entity, key=_RANK.__getitem__))
        else:
            out.append((start, end, entity))
    return out


def redact(text: str) -> str:
    """`text` with every finding replaced by `<ENTITY>` (in its normalised form); as is when none."""
    norm = normalize(text)
    found = _find(norm, 0) if len(norm) >= MIN_LEN else []
    if not found:
        return text
    parts: list[str] = []
    at = 0
    for start, end, entity in found:
        parts += (norm[at:start], f"<{entity}>")
        at = end
    parts.append(norm[at:])
    return "".join(parts)


_CREDENTIAL_KEY = re.compile(
    r"(?:password|passwd|passphrase|pwd|secret|token|api_?key|access_?key|private_?key|authorization"
    r"|credentials?)$"
)
_NUMBER_MIN, _NUMBER_MAX = 10**11, 10**19
"""Integers of 12 to 19 digits are checked for card numbers; shorter and longer ones cannot be."""


def audit_view(args: dict[str, Any], limit: int = SCAN_LIMIT) -> dict[str, Any]:
    """The arguments as the audit record keeps them: values, with every finding replaced."""
    return _View(limit).mapping(args)


class _View:
    """One walk over the arguments, with what is left of the scan limit."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def mapping(self, value: dict[str, Any]) -> dict[str, Any]:
        return {
            k: f"<{SECRET}>" if isinstance(v, str) and v and _credential(str(k)) else self.value(v)
            for k, v in value.items()
        }

    def value(self, value: Any) -> Any:
        kind = type(value)  # exact types first: what JSON gives, and the cheapest test
        if kind is str:
            return self.text(value)
        if kind is dict:
            return self.mapping(value)
        if kind is list:
            return [self.value(v) for v in value]
        if kind is int or kind is float:
            return self.number(value)
        if value is None or kind is bool:
            return value
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        # a subclass (an enum, an OrderedDict): as its base
        if isinstance(value, str):
            return self.text(str.__str__(value))
        if isinstance(value, dict):
            return self.mapping(dict(value))
        if isinstance(value, int):
            return self.number(int(value))
        if isinstance(value, float):
            return self.number(float(value))
        return f"<{kind.__name__}>"  # not JSON: never stored as it is

    def text(self, text: str) -> str:
        if len(text) < MIN_LEN:
            return text
        if not self.spend(len(text) if text.isascii() else len(text.encode("utf-8"))):
            return f"<unscanned:{len(text)}>"
        return redact(text)

    def number(self, value: int | float) -> int | float | str:
        n = int(value) if isinstance(value, float) and value.is_integer() else value
        if not isinstance(n, int) or not _NUMBER_MIN <= abs(n) < _NUMBER_MAX:
            return value
        digits = str(abs(n))
        if not self.spend(len(digits)):
            return f"<unscanned:{len(digits)}>"
        return "<CREDIT_CARD>" if card_like(digits) else value

    def spend(self, size: int) -> bool:
        """Take `size` bytes of the scan limit; once a leaf does not fit, nothing more is scanned."""
        if size > self.left:
            self.left = 0
            return False
        self.left -= size
        return True


@lru_cache(maxsize=4096)
def _credential(key: str) -> bool:
    """Whether a key names a credential (`password`, `db_password`, `apiKey`, `X-Auth-Token`)."""
    return len(key) <= 64 and _CREDENTIAL_KEY.search(key.lower().replace("-", "_")) is not None
