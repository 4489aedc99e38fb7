"""Every detector is linear in its input, and a crafted argument cannot stall the gateway.

Each case feeds one detector a megabyte built to make it backtrack: runs of the characters two
quantifiers both accept, many starts that would each rescan the same run, a PEM header with no
footer, URL-ish runs. Before the detectors were rewritten, several of these inputs took seconds at
20 KB (and would take hours at 1 MB); now each must finish within a bound scaled from a plain
linear pass over the same text in the same process, so a slow machine moves both.

Run as a script to print each case's time (`python tests/redaction/test_linear_time.py [chars]`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

from gateway.app import Gateway
from gateway.config import RedactionConfig
from gateway.identity.devkeys import DevKey
from gateway.redaction import basic
from gateway.redaction.engine import Scanner, build_scanner
from gateway.redaction.injection import scan_text
from gateway.redaction.normalize import encoded_spans, normalize
from gateway.redaction.secrets import (
    SECRET,
    high_entropy_recognizer,
    secret_recognizer,
    separated_card_recognizer,
)
from tests.conftest import free_port, make_config, running_gateway
from tests.mcp_support import audit_rows, modern_call, modern_headers

SIZE = 1_000_000
FACTOR = 2_000
"""Bastion's own detectors may take this many times as long as a plain regex pass over the same
text (`re.findall` of a character it does not hold: about 0.5 ms per megabyte here). The worst
measured is about 500 times; a quadratic detector takes hours on a megabyte."""
PRESIDIO_FACTOR = 40_000
"""Through the scanner, Presidio builds Python objects for every match (some 30 µs each), so
text dense with matches costs far more per character: up to about 10,000 times the plain pass
(a megabyte of `A1 `, each a weak driver's licence match, takes 5 s). Still linear."""
FLOOR_S = 3.0
"""The bound is never below this, so that a fast baseline on a busy machine does not flake."""


def fill(unit: str, head: str = "", n: int = SIZE) -> str:
    """`head`, then `unit` repeated up to `n` characters."""
    body = unit * ((n - len(head)) // len(unit) + 1)
    return (head + body)[:n]


PEM_HEAD = "-----BEGIN RSA PRIVATE KEY-----\n"
B64_LINE = base64.b64encode(bytes(range(48))).decode() + "\n"
TOKEN_16 = "0123456789abcdef"
"""Sixteen characters of a token: without them the API-key recognizer's prefilter skips the text."""
TOOL_NAMES = [f"tool_{i}" for i in range(3000)] + [f"svc.part{i}.run" for i in range(3000)]

SECRET_CASES: dict[str, Callable[[int], str]] = {
    "aws_access_key_id": lambda n: fill("AKIA" + "A" * 15 + " ", n=n),
    "aws_secret_access_key": lambda n: fill("aws", n=n),
    "aws_secret_access_key/spaces": lambda n: fill(" ", "aws_secret_access_key", n),
    "github_token": lambda n: fill("ghp_" + "a1" * 150 + "_ ", n=n),
    "gitlab_token": lambda n: fill("glpat-" + "a" * 19 + " ", n=n),
    "slack_token": lambda n: fill("xoxb-" + "a" * 9 + " ", n=n),
    "slack_webhook": lambda n: fill("https://hooks.slack.com/services/" + "a" * 19 + " ", n=n),
    "stripe_key": lambda n: fill("sk_live_" + "a" * 15 + " ", n=n),
    "jwt": lambda n: fill("eyJ-", n=n),
    "jwt/segments": lambda n: fill("eyJaaaaa.eyJ-", n=n),
    "pem_private_key": lambda n: fill(B64_LINE, PEM_HEAD, n),
    "pem_private_key/headers": lambda n: fill(PEM_HEAD + "A" * 64 + "!", n=n),
    "connection_string_password": lambda n: fill("://" + "a" * 256 + ":" + "b" * 256 + " ", n=n),
    "password_assignment": lambda n: fill(" ", "password", n),
    "password_assignment/quotes": lambda n: fill(" '", "password", n),
}
ENTROPY_CASES: dict[str, Callable[[int], str]] = {
    "keyed_value": lambda n: fill("\t", TOKEN_16 + " token", n),
    "keyed_value/spaces": lambda n: fill(" ", TOKEN_16 + " api_key", n),
    "keyed_value/names": lambda n: fill("token ", TOKEN_16 + " ", n),
    "random_token": lambda n: fill("aB3+", n=n),
    "random_token/runs": lambda n: fill("aB3" * 10 + "=.", n=n),
}
CARD_CASES: dict[str, Callable[[int], str]] = {
    "separated_card/dashes": lambda n: fill("1-", n=n),
    "separated_card/spaces": lambda n: fill("4 1 1 1 ", n=n),
}
ENCODED_CASES: dict[str, Callable[[int], str]] = {
    "urlish": lambda n: fill("%", "http://x/?q=", n),
    "urlish/runs": lambda n: fill("a%z", "%41 ", n),
    "base64": lambda n: fill("QUFB", n=n),
    "hex": lambda n: fill("41", n=n),
}
INJECTION_CASES: dict[str, Callable[[int], str]] = {
    "instruction_override": lambda n: fill("ignore all the previous ", n=n),
    "instruction_override/tags": lambda n: fill("< / ", n=n),
    "instruction_override/spaces": lambda n: fill(" ", "<", n),
    "tool_reference/call": lambda n: fill("use the other ", n=n),
    "tool_reference/name": lambda n: fill("a", "use ", n),
    "tool_reference/names": lambda n: fill("svc.part.tool_x.", n=n),
    "secret_reference": lambda n: fill("api secret ", n=n),
    "hidden_characters": lambda n: fill("a\u200b", n=n),
}
SCANNER_CASES: dict[str, tuple[str, Callable[[int], str]]] = {
    "EMAIL_ADDRESS/local-part": ("EMAIL_ADDRESS", lambda n: fill("a-" * 150 + "@", n=n)),
    "EMAIL_ADDRESS/domain": ("EMAIL_ADDRESS", lambda n: fill("a@a.", n=n)),
    "EMAIL_ADDRESS/at-signs": ("EMAIL_ADDRESS", lambda n: fill("a@", n=n)),
    "PHONE_NUMBER": ("PHONE_NUMBER", lambda n: fill("1-", n=n)),
    "CREDIT_CARD": ("CREDIT_CARD", lambda n: fill("4111 ", n=n)),
    "US_SSN": ("US_SSN", lambda n: fill("219-09-", n=n)),
    "IBAN_CODE": ("IBAN_CODE", lambda n: fill("DE893704", n=n)),
    "IP_ADDRESS/v4": ("IP_ADDRESS", lambda n: fill("1.", n=n)),
    "IP_ADDRESS/v6": ("IP_ADDRESS", lambda n: fill("::", n=n)),
    "US_BANK_NUMBER": ("US_BANK_NUMBER", lambda n: fill("12345678 ", n=n)),
    "US_PASSPORT": ("US_PASSPORT", lambda n: fill("A12345678 ", n=n)),
    "US_DRIVER_LICENSE": ("US_DRIVER_LICENSE", lambda n: fill("A1 ", n=n)),
    "US_ITIN": ("US_ITIN", lambda n: fill("912-70-", n=n)),
    "UK_NHS": ("UK_NHS", lambda n: fill("123 ", n=n)),
    "CRYPTO": ("CRYPTO", lambda n: fill("1a", n=n)),
    "MAC_ADDRESS": ("MAC_ADDRESS", lambda n: fill("aa:", n=n)),
    "URL/dots": ("URL", lambda n: fill("a.", n=n)),
    "URL/hosts": ("URL", lambda n: fill("www.a.", n=n)),
    "URL/schemes": ("URL", lambda n: fill("http://a.", n=n)),
    "UUID": ("UUID", lambda n: fill("aaaaaaaa-", n=n)),
    "DATE_TIME": ("DATE_TIME", lambda n: fill("1-", n=n)),
    "MEDICAL_LICENSE": ("MEDICAL_LICENSE", lambda n: fill("a9", n=n)),
    "SECRET/url-encoded": ("SECRET", lambda n: fill("%", "token=", n)),
    "SECRET/base64": ("SECRET", lambda n: base64.b64encode(fill(" ", "token", n * 3 // 4).encode()).decode()),
}
BASIC_CASES: dict[str, Callable[[int], str]] = {
    "basic/US_SSN": lambda n: fill("219-09-", n=n),
    "basic/US_SSN/dense": lambda n: fill("219-09-9999 ", n=n),
    "basic/PHONE_NUMBER/dashes": lambda n: fill("1-", n=n),
    "basic/PHONE_NUMBER/north-american": lambda n: fill("(415) 555-", n=n),
    "basic/PHONE_NUMBER/plus": lambda n: fill("+1 2", n=n),
    "basic/IBAN_CODE": lambda n: fill("DE893704", n=n),
    "basic/IBAN_CODE/groups": lambda n: fill("DE89 3704 ", n=n),
    "basic/UK_NINO": lambda n: fill("AB 12 34 ", n=n),
    "basic/CREDIT_CARD": lambda n: fill("4111 ", n=n),
    "basic/CREDIT_CARD/dashes": lambda n: fill("1-", n=n),
    "basic/EMAIL_ADDRESS/local-part": lambda n: fill("a-" * 150 + "@", n=n),
    "basic/EMAIL_ADDRESS/domain": lambda n: fill("a@a.", n=n),
    "basic/EMAIL_ADDRESS/at-signs": lambda n: fill("a@", n=n),
    "basic/SECRET/keyword": lambda n: fill(" ", TOKEN_16 + " token", n),
    "basic/SECRET/password": lambda n: fill(" ", "password", n),
    "basic/SECRET/jwt": lambda n: fill("eyJ-", n=n),
    "basic/SECRET/pem": lambda n: fill(PEM_HEAD + "A" * 64 + "!", n=n),
    "basic/SECRET/random": lambda n: fill("aB3+", n=n),
    "basic/base64": lambda n: fill("QUFB", n=n),
    "basic/hex": lambda n: fill("41", n=n),
    "basic/url-encoded": lambda n: fill("%", "http://x/?q=", n),
}
"""The audit view's built-in detectors (`gateway.redaction.basic`), on `basic.SCAN_LIMIT` (64 KiB)
of crafted text, the most they scan per record: a quadratic detector takes minutes on it."""


@cache
def scanner(entity: str) -> Scanner:
    return build_scanner(RedactionConfig(entities=[entity], scan_limit_bytes=2 * SIZE))


def detector(case: str) -> tuple[Callable[[str], Any], str]:
    """The detector a case exercises and its input."""
    if case in SECRET_CASES:
        rec = secret_recognizer()
        return lambda t: rec.analyze(t, [SECRET]), SECRET_CASES[case](SIZE)
    if case in ENTROPY_CASES:
        rec = high_entropy_recognizer()
        return lambda t: rec.analyze(t, [SECRET]), ENTROPY_CASES[case](SIZE)
    if case in CARD_CASES:
        rec = separated_card_recognizer()
        return lambda t: rec.analyze(t, ["CREDIT_CARD"]), CARD_CASES[case](SIZE)
    if case in BASIC_CASES:
        return basic.redact, BASIC_CASES[case](basic.SCAN_LIMIT)
    if case in ENCODED_CASES:
        return lambda t: list(encoded_spans(t, 2 * SIZE)), ENCODED_CASES[case](SIZE)
    if case in INJECTION_CASES:
        return lambda t: scan_text(t, "description", TOOL_NAMES, "self"), INJECTION_CASES[case](SIZE)
    entity, build = SCANNER_CASES[case]
    return scanner(entity).find, build(SIZE)


ALL_CASES = [
    *SECRET_CASES,
    *ENTROPY_CASES,
    *CARD_CASES,
    *ENCODED_CASES,
    *INJECTION_CASES,
    *SCANNER_CASES,
    *BASIC_CASES,
]


def elapsed(fn: Callable[[str], Any], text: str) -> float:
    start = time.perf_counter()
    fn(text)
    return time.perf_counter() - start


def linear_pass(text: str) -> float:
    """The time of a plain linear scan of `text` (best of three)."""
    return min(elapsed(lambda t: len(re.findall(r"\x00", t)), text) for _ in range(3))


@pytest.mark.parametrize("case", ALL_CASES)
def test_detector_is_linear(case: str) -> None:
    fn, text = detector(case)
    fn(text[:1000])  # compile and warm up outside the timing
    factor = PRESIDIO_FACTOR if case in SCANNER_CASES else FACTOR
    bound = max(FLOOR_S, factor * linear_pass(text))
    took = elapsed(fn, text)
    assert took < bound, f"{case}: {took:.2f} s for {len(text)} characters (bound {bound:.2f} s)"


def test_normalize_is_linear() -> None:
    text = fill("\uff11\u200b\u00ad\u202e")
    bound = max(FLOOR_S, FACTOR * linear_pass(text))
    assert elapsed(normalize, text) < bound


def test_the_audit_view_of_a_crafted_record_scans_at_most_its_limit() -> None:
    """Every crafted input at once, a quarter of the scan limit each (some 340 KB of arguments):
    the first four are scanned, the rest stored as their length, so the view costs what 64 KiB
    of crafted text costs, however large the arguments."""
    quarter = basic.SCAN_LIMIT // 4
    args = {f"arg{i}": build(quarter) for i, build in enumerate(BASIC_CASES.values())}
    basic.audit_view({name: text[:1000] for name, text in args.items()})  # warm up
    start = time.perf_counter()
    view = basic.audit_view(args)
    took = time.perf_counter() - start
    unscanned = [name for name, value in view.items() if value == f"<unscanned:{quarter}>"]
    assert unscanned == list(args)[4:]
    assert took < FLOOR_S, f"{took:.2f} s for the view of {len(args) * quarter} characters"


# -- through the gateway ----------------------------------------------------------------------

STALL_S = 0.5
"""/healthz must answer within this while the gateway scans a crafted argument."""


def crafted_arguments(size: int) -> dict[str, str]:
    """The inputs that were worst for the argument scan before the rewrite, `size` characters
    each: a keyword followed by spaces, `%` runs, `eyJ-` runs, PEM headers without footers, and
    runs of `a-` before an `@`. Together they stay under the 1 MB body limit. Size 0: 14 KB of
    the first alone, which is scanned on the event loop (it is under 16 KB) and stalled it for
    seconds."""
    if not size:
        return {"api_key": fill(" ", TOKEN_16 + " token", 14_000)}
    return {
        "api_key": fill(" ", TOKEN_16 + " token", size),
        "password": fill(" ", "password", size),
        "link": fill("%", "http://x/?q=", size),
        "jwt": fill("eyJ-", n=size),
        "key": fill(PEM_HEAD.strip() + "A" * 64 + "!", n=size),
        "mail": fill("a-" * 150 + "@", n=size),
    }


def poll(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """GET `url` every 10 ms until `stop`, recording how long each answer took."""
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            start = time.perf_counter()
            assert client.get(url).status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)


@pytest.fixture(scope="module")
async def redacting_gateway(
    upstream_url: str, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Gateway]]:
    """Bastion with redaction at its defaults (1 MB scan limit) in front of the demo upstream."""
    audit_db = tmp_path_factory.mktemp("redos") / "audit.db"
    cfg = make_config(
        data_dir,
        {"demo": upstream_url},
        free_port(),
        redaction={},
        audit={"url": f"sqlite+aiosqlite:///{audit_db}"},
    )
    async with running_gateway(cfg) as running:
        yield running


@pytest.mark.parametrize(
    "size",
    [0, 140_000],
    ids=["one 14 KB string, scanned on the event loop", "840 KB, scanned in a worker thread"],
)
async def test_a_crafted_argument_from_a_denied_principal_does_not_stall_the_gateway(
    redacting_gateway: tuple[str, Gateway], dev_key: DevKey, http: httpx.AsyncClient, size: int
) -> None:
    base, gateway = redacting_gateway
    token = dev_key.mint("mallory", groups=("visitors",), audience=f"{base}/mcp/demo")
    body = json.dumps(modern_call("echo", crafted_arguments(size))).encode()
    assert len(body) < gateway.cfg.listen.max_body_bytes
    latencies: list[float] = []
    stop = threading.Event()
    # From another thread, so that a stalled event loop (the gateway's, which the test shares)
    # cannot delay the probes themselves, only their answers.
    poller = asyncio.create_task(asyncio.to_thread(poll, f"{base}/healthz", stop, latencies))
    await asyncio.sleep(0.1)
    headers = modern_headers(token, "tools/call", "echo") | {"content-type": "application/json"}
    start = time.perf_counter()
    answer = await http.post(f"{base}/mcp/demo", content=body, headers=headers, timeout=60)
    took = time.perf_counter() - start
    stop.set()
    await poller
    assert answer.status_code == 200
    record = (await audit_rows(gateway))[-1]
    assert record["decision"]["effect"] == "deny" and record["decision"]["stage"] == "policy", record[
        "decision"
    ]
    assert set(record["args_redacted"]) == set(crafted_arguments(size))
    assert latencies
    assert max(latencies) < STALL_S, (
        f"/healthz took {max(latencies):.2f} s while a {took:.2f} s call was scanned"
    )


def main(size: int) -> None:
    global SIZE
    SIZE = size
    for case in ALL_CASES:
        fn, text = detector(case)
        fn(text[:1000])
        print(f"{case:36s} {elapsed(fn, text) * 1e3:10.1f} ms", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else SIZE)
