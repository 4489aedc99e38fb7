"""Redaction quality and speed: a labelled synthetic corpus, precision/recall per entity, µs per KB.

    python -m bench.redaction            # prints both tables

`synthetic_corpus` builds sentences that carry known entities (valid card numbers, SSNs, IBANs
with correct checksums, phone numbers in several formats, secrets) mixed with look-alikes that
are not entities (order numbers, dates, hashes, UUIDs, prices), and applies the evasions the
scanner must undo (zero-width and bidi characters, full-width digits, odd card separators,
base64 / URL / hex encoding) to a share of them. Scoring is per sample and entity type: with
`e` expected and `p` found, min(e, p) are true positives, the rest false positives/negatives.
"""

from __future__ import annotations

import base64
import random
import statistics
import string
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from gateway.config import RedactionConfig
from gateway.redaction.engine import Scanner, build_scanner
from gateway.redaction.walk import scan_json

ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS", "SECRET")
SIZES = (1024, 64 * 1024, 1024 * 1024)


@dataclass(slots=True)
class Sample:
    text: str
    labels: dict[str, int] = field(default_factory=dict)
    evasion: str | None = None


# -- value generators ---------------------------------------------------------------------------


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def card(rng: random.Random) -> str:
    kind = rng.choice(["visa", "mc", "amex"])
    if kind == "amex":
        digits = _luhn_complete(rng.choice(["34", "37"]), 15, rng)
        groups = [digits[:4], digits[4:10], digits[10:]]
    else:
        digits = _luhn_complete("4" if kind == "visa" else str(rng.randint(51, 55)), 16, rng)
        groups = [digits[i : i + 4] for i in range(0, 16, 4)]
    return rng.choice([" ", "-", ""]).join(groups)


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666 and a < 900])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


_AREA_CODES = (212, 213, 303, 305, 312, 404, 415, 512, 617, 646, 702, 713, 206, 718, 818, 917)


def phone(rng: random.Random) -> str:
    a, b, c = rng.choice(_AREA_CODES), rng.randint(201, 989), rng.randint(0, 9999)
    return rng.choice([f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"+1 {a} {b} {c:04d}", f"{a}.{b}.{c:04d}"])


def email(rng: random.Random) -> str:
    first = rng.choice(["jane", "john", "ana", "li", "omar", "priya", "max", "sofia"])
    last = rng.choice(["roe", "doe", "smith", "garcia", "chen", "khan", "muller"])
    sep = rng.choice([".", "_", ""])
    dom = rng.choice(["example.org", "mail.example.com", "corp.example.net", "example.co.uk"])
    return f"{first}{sep}{last}{rng.randint(1, 99)}@{dom}"


def _iban_check(country: str, bban: str) -> str:
    moved = bban + country + "00"
    number = int("".join(str(int(ch, 36)) for ch in moved))
    return f"{98 - number % 97:02d}"


def iban(rng: random.Random) -> str:
    country = rng.choice(["DE", "GB", "FR"])
    if country == "DE":
        bban = "".join(rng.choice(string.digits) for _ in range(18))
    elif country == "GB":
        bban = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(4))
        bban += "".join(rng.choice(string.digits) for _ in range(14))
    else:
        bban = "".join(rng.choice(string.digits) for _ in range(23))
    value = country + _iban_check(country, bban) + bban
    if rng.random() < 0.4:
        value = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
    return value


def ip(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    return "2001:db8:" + ":".join(f"{rng.randint(0, 0xFFFF):x}" for _ in range(4)) + "::1"


def _rand(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def secret(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return "AKIA" + _rand(rng, 16, string.ascii_uppercase + "234567")
    if kind == 1:
        return "ghp_" + _rand(rng, 36)
    if kind == 2:
        return "sk_live_" + _rand(rng, 24)
    if kind == 3:
        head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
        body = base64.urlsafe_b64encode(f'{{"sub":"{_rand(rng, 8)}"}}'.encode()).rstrip(b"=").decode()
        return f"{head}.{body}.{_rand(rng, 43, string.ascii_letters + string.digits + '-_')}"
    if kind == 4:
        return "xoxb-" + "-".join(_rand(rng, 12, string.digits) for _ in range(2)) + "-" + _rand(rng, 24)
    if kind == 5:
        return "glpat-" + _rand(rng, 20)
    return "api_key=" + _rand(rng, 32)


GENERATORS = {
    "EMAIL_ADDRESS": (email, ["write to {}", "contact: {}", "cc {} please"]),
    "PHONE_NUMBER": (phone, ["call {} after 5", "phone {}", "reach me on {}"]),
    "CREDIT_CARD": (card, ["card {} exp 09/29", "pay with {}", "cc number {}"]),
    "US_SSN": (ssn, ["SSN {}", "social security number {}", "ssn: {}"]),
    "IBAN_CODE": (iban, ["IBAN {}", "wire to {}", "account {}"]),
    "IP_ADDRESS": (ip, ["from {}", "host {} is down", "ip={}"]),
    "SECRET": (secret, ["token {}", "use {}", "creds: {}"]),
}

DECOYS = [
    "order #{} shipped",
    "invoice {} due",
    "build {} passed",
    "sha256 {}",
    "request id {}",
    "total ${}",
    "meeting at {}",
    "version {}",
]


def _decoy(rng: random.Random) -> str:
    kind = rng.randrange(8)
    value = [
        lambda: str(rng.randint(10000, 99999999)),
        lambda: f"INV-{rng.randint(2020, 2026)}-{rng.randint(1, 99999):05d}",
        lambda: str(rng.randint(1000, 99999)),
        lambda: _rand(rng, 64, "0123456789abcdef"),
        lambda: "-".join(_rand(rng, n, "0123456789abcdef") for n in (8, 4, 4, 4, 12)),
        lambda: f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
        lambda: f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} {rng.randint(10, 23)}:{rng.randint(10, 59)}",
        lambda: f"{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 99)}",
    ][kind]()
    return DECOYS[kind].format(value)


_ZW = "\u200b\u200c\u200d\u2060"


def _zero_width(text: str, rng: random.Random) -> str:
    return "".join(ch + (rng.choice(_ZW) if ch.isalnum() and rng.random() < 0.3 else "") for ch in text)


def _full_width(text: str) -> str:
    return "".join(chr(0xFF10 + int(ch)) if ch.isdigit() else ch for ch in text)


EVASIONS = {
    "zero-width": lambda v, rng: _zero_width(v, rng),
    "bidi": lambda v, rng: f"\u202e{v}\u202c",
    "full-width": lambda v, rng: _full_width(v),
    "base64": lambda v, rng: base64.b64encode(v.encode()).decode(),
    "url": lambda v, rng: urllib.parse.quote(v, safe=""),
    "hex": lambda v, rng: v.encode().hex(),
}


def synthetic_corpus(n: int = 1000, seed: int = 7, evasion_rate: float = 0.3) -> list[Sample]:
    """`n` labelled samples: one to three entities (or none) among decoys, a share of them disguised."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for _ in range(n):
        parts: list[str] = []
        labels: dict[str, int] = {}
        evasion = None
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            entity = rng.choice(ENTITIES)
            gen, templates = GENERATORS[entity]
            value = gen(rng)
            if rng.random() < evasion_rate:
                evasion = rng.choice(sorted(EVASIONS))
                value = EVASIONS[evasion](value, rng)
                if entity == "CREDIT_CARD" and evasion == "zero-width":
                    value = value.replace(" ", rng.choice([".", "/", " - "]))
            parts.append(rng.choice(templates).format(value))
            labels[entity] = labels.get(entity, 0) + 1
        for _ in range(rng.randint(1, 3)):
            parts.insert(rng.randrange(len(parts) + 1), _decoy(rng))
        out.append(Sample("; ".join(parts), labels, evasion))
    return out


# -- measurements -------------------------------------------------------------------------------


def _scanner(cfg: RedactionConfig | None) -> Scanner:
    return build_scanner(cfg or RedactionConfig(scan_limit_bytes=4 * 1024 * 1024))


def quality(n: int = 2000, seed: int = 7, cfg: RedactionConfig | None = None) -> dict[str, dict[str, float]]:
    """Precision, recall and support per entity type on `synthetic_corpus(n, seed)`."""
    scanner = _scanner(cfg)
    tp = dict.fromkeys(ENTITIES, 0)
    fp = dict.fromkeys(ENTITIES, 0)
    fn = dict.fromkeys(ENTITIES, 0)
    for sample in synthetic_corpus(n, seed):
        _, findings = scanner.find(sample.text)
        found: dict[str, int] = {}
        for f in findings:
            for t in f.counted:
                found[t] = found.get(t, 0) + 1
        for entity in ENTITIES:
            e, p = sample.labels.get(entity, 0), found.get(entity, 0)
            tp[entity] += min(e, p)
            fp[entity] += max(0, p - e)
            fn[entity] += max(0, e - p)
    return {
        e: {
            "precision": tp[e] / (tp[e] + fp[e]) if tp[e] + fp[e] else 1.0,
            "recall": tp[e] / (tp[e] + fn[e]) if tp[e] + fn[e] else 1.0,
            "support": float(tp[e] + fn[e]),
        }
        for e in ENTITIES
    }


def payload(size: int, seed: int = 11, dense: bool = True) -> dict[str, Any]:
    """A tool result-like JSON value of `size` bytes of text: prose with corpus samples mixed in,
    one per ~250 bytes (`dense`, a customer export) or one per ~4 KB (ordinary prose)."""
    rng = random.Random(seed)
    filler = "The quarterly review covered onboarding, support queues and the roadmap. "
    chunks: list[str] = []
    total = 0
    samples = synthetic_corpus(max(4, size // 400), seed, evasion_rate=0.1)
    i = 0
    prose = (1, 4) if dense else (50, 60)
    while total < size:
        piece = filler * rng.randint(*prose) + samples[i % len(samples)].text + " "
        chunks.append(piece)
        total += len(piece)
        i += 1
    text = "".join(chunks)[:size]
    return {"content": [{"type": "text", "text": text}]}


def speed(
    sizes: tuple[int, ...] = SIZES, repeat: int = 5, cfg: RedactionConfig | None = None, dense: bool = True
) -> dict[int, float]:
    """Median µs per KB to scan one payload of each size (find every entity, as Bastion does)."""
    scanner = _scanner(cfg)
    out: dict[int, float] = {}
    for size in sizes:
        value = payload(size, dense=dense)
        limit = max(size * 2, 1024)
        runs = max(1, repeat if size <= 64 * 1024 else max(1, repeat // 2))
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            scan_json(scanner, value, limit)
            times.append(time.perf_counter() - t0)
        out[size] = statistics.median(times) * 1e6 / (size / 1024)
    return out


def main() -> None:
    print("entity         precision  recall  support")
    for entity, m in quality().items():
        print(f"{entity:<14} {m['precision']:>9.3f}  {m['recall']:>6.3f}  {int(m['support']):>7}")
    dense, sparse = speed(dense=True), speed(dense=False)
    print("\npayload   µs/KB dense  µs/KB sparse")
    for size in SIZES:
        print(f"{size // 1024:>5} KB  {dense[size]:>11.1f}  {sparse[size]:>12.1f}")


if __name__ == "__main__":
    main()
