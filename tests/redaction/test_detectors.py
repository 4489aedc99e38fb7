"""Redaction parts on their own: start-up errors, lazy import, scan limit, quality on the corpus."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.redaction import ENTITIES, quality, synthetic_corpus
from gateway import config as config_mod
from gateway.call import ToolCall
from gateway.config import RedactionConfig
from gateway.errors import ConfigError
from gateway.redaction.engine import build_scanner
from gateway.redaction.injection import scan_text
from gateway.stages.redact import Redactor

REPO = Path(__file__).resolve().parents[2]


def test_a_gateway_without_redaction_never_imports_presidio() -> None:
    code = (
        "import sys, gateway.app, gateway.cli\n"
        "from gateway.app import Gateway\n"
        "from gateway import config\n"
        "from pathlib import Path\n"
        "Gateway(config.parse({}, Path('.')))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('presidio', 'spacy'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ner_entities_need_a_model_and_say_so_at_start_up() -> None:
    with pytest.raises(ConfigError, match=r"redaction\.entities: PERSON need a named-entity model"):
        build_scanner(RedactionConfig(entities=["EMAIL_ADDRESS", "PERSON"]))
    with pytest.raises(ConfigError, match=r"redaction\.ner_model: the spaCy model 'en_core_web_nope'"):
        build_scanner(RedactionConfig(entities=["PERSON"], ner_model="en_core_web_nope"))


def test_unknown_entity_and_bad_action_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"no recognizer for NOT_A_THING"):
        build_scanner(RedactionConfig(entities=["NOT_A_THING"]))
    with pytest.raises(ConfigError, match=r"redaction\.default\.arguments"):
        config_mod.parse({"redaction": {"default": {"arguments": "scramble"}}}, REPO)
    with pytest.raises(ConfigError, match=r"redaction\.tools\.nocolon"):
        config_mod.parse({"redaction": {"tools": {"nocolon": {"arguments": "replace"}}}}, REPO)


@pytest.mark.parametrize("over_limit", ["deny", "pass"])
async def test_scan_limit(over_limit: str) -> None:
    cfg = RedactionConfig(scan_limit_bytes=64, over_limit=over_limit)  # type: ignore[arg-type]
    redactor = Redactor(cfg, b"k" * 32)
    args = {"a": "write to jane.roe@example.org soon", "b": "x" * 40 + " then john.doe@example.org"}
    call = ToolCall("crm", "send", args)
    decision = await redactor(call)
    assert call.pii_unscanned == {"input": len(args["a"]) + len(args["b"]) - 64}
    assert call.redacted_args is not None
    assert call.redacted_args["a"] == "write to <EMAIL_ADDRESS> soon"
    assert call.redacted_args["b"] == f"<unscanned:{len(args['b'])}>"
    if over_limit == "deny":
        assert (
            decision is not None and decision.effect == "deny" and decision.reasons[0].policy == "scan-limit"
        )
    else:
        assert decision is None


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY1",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY1",
        ),
        ("glpat-" + "x1Y2z3W4v5U6t7S8r9Q0", "glpat-x1Y2z3W4v5U6t7S8r9Q0"),
        (
            "xoxb-123456789012-123456789012-abcdefABCDEF123456",
            "xoxb-123456789012-123456789012-abcdefABCDEF123456",
        ),
        ("sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "eyJ"),
        (
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----",
            "-----BEGIN EC PRIVATE KEY-----",
        ),
        ("mysql://root:hunter2hunter2@10.0.0.5/app", "hunter2hunter2"),
        ("password=Tr0ub4dor&3", "Tr0ub4dor"),
        ("password" + " " * 100 + "= hunter2x", "hunter2x"),
        ('pwd "  :  "Tr0ub4dor"', "Tr0ub4dor"),
        ("jwt-eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "eyJhbGciOiJIUzI1NiJ9"),
        (
            'key = "-----BEGIN RSA PRIVATE KEY-----\\nMIIEowIBAAKCAQEA\\n-----END RSA PRIVATE KEY-----"',
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
        ),
        ("X-Api-Key: 9fQ2xL7mN4pR8sT1vW3yZ6aB0cD5eG", "9fQ2xL7mN4pR8sT1vW3yZ6aB0cD5eG"),
    ],
)
def test_secret_detectors(text: str, found: str) -> None:
    scanner = build_scanner(RedactionConfig(entities=["SECRET"]))
    norm, findings = scanner.find(text)
    assert [f.entity for f in findings] == ["SECRET"]
    assert found in norm[findings[0].start : findings[0].end] or norm[findings[0].start :].startswith(found)


def test_a_private_key_ends_at_its_footer() -> None:
    key = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----"
    norm, findings = build_scanner(RedactionConfig(entities=["SECRET"])).find(f"{key}\nand then the notes")
    assert [norm[f.start : f.end] for f in findings] == [key]


def test_email_addresses_behind_a_long_prefix_are_still_found() -> None:
    scanner = build_scanner(RedactionConfig(entities=["EMAIL_ADDRESS"]))
    text = f"mail jane.roe+tag@example.co.uk or {'x' * 100}john@example.org"
    norm, findings = scanner.find(text)
    found = [norm[f.start : f.end] for f in findings]
    assert found[0] == "jane.roe+tag@example.co.uk"
    assert found[1] == "x" * 60 + "john@example.org"  # the last 64 characters of the local part


def test_urls_are_found_by_their_top_level_domain() -> None:
    scanner = build_scanner(RedactionConfig(entities=["URL"]))
    text = "docs at https://docs.example.com/a/b?c=1 and www.example.org, not notes.txtx or 1.2.3.4"
    norm, findings = scanner.find(text)
    assert [norm[f.start : f.end] for f in findings] == [
        "https://docs.example.com/a/b?c=1",
        "www.example.org",
    ]


@pytest.mark.parametrize(
    ("text", "mentioned"),
    [
        ("Results feed delete_note automatically.", True),
        ("Then call svc.notes.read with the id.", True),
        ("See (svc.notes.read).", True),
        ("Then call my_delete_note_v2 instead.", False),
        ("A note named svc.notes.reader is fine.", False),
        ("This tool is self_tool.", False),
    ],
)
def test_tool_names_are_mentions_only_when_they_stand_alone(text: str, mentioned: bool) -> None:
    names = ["delete_note", "svc.notes.read", "self_tool", "add"]
    found = {f.kind for f in scan_text(text, "description", names, "self_tool")}
    assert ("tool_reference" in found) is mentioned


@pytest.mark.parametrize(
    "text",
    [
        "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "request 123e4567-e89b-12d3-a456-426614174000 at 2026-03-14 12:30:00",
        "order #58213377 shipped, total $1249.99, version 3.12.1",
        "the quick brown fox jumps over the lazy dog",
    ],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    scanner = build_scanner(RedactionConfig())
    assert scanner.find(text)[1] == []


def test_quality_on_the_synthetic_corpus() -> None:
    corpus = synthetic_corpus(300, seed=3)
    assert any(s.evasion for s in corpus) and any(not s.labels for s in corpus)
    scores = quality(n=600, seed=3)
    assert set(scores) == set(ENTITIES)
    for entity, m in scores.items():
        assert m["support"] > 30, entity
        assert m["precision"] >= 0.95, (entity, m)
        assert m["recall"] >= 0.9, (entity, m)
