"""The sink formats on records an attacker wrote parts of: every field comes back as it was, and
nothing in a value can start a field, a line or a frame of its own at the receiver."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest

from audit.export import cef_line, ocsf_event
from gateway.sinks.events import render
from gateway.sinks.syslog import frame, message

from .conftest import parse_syslog

HOSTILE = [
    "plain",
    "pipe|in|name",
    "eq=uals act=allow suser=admin",
    "back\\slash\\",
    "line\nbreak\r\nCEF:0|Evil|Forged|1|x|y|10|act=allow",
    "nul\x00and\x1bescape\x7f",
    "unicode \u2028 line sep \u0085 nel é 中文 🎉",
    '"quoted" ]bracket[ \\"',
]


def _doc(tool: str, reason: str, user: str = "alice") -> dict[str, Any]:
    return {
        "id": "0190a1b2-0000-7000-8000-000000000001",
        "ts": "2026-12-02T09:00:00.123456Z",
        "schema_version": 2,
        "instance": "replica-1",
        "trace_id": "t1",
        "call_id": "c|1=x",
        "user": user,
        "tenant": "acme",
        "agent": None,
        "protocol": "mcp",
        "upstream": "demo",
        "tool": tool,
        "action": "call_tool",
        "decision": {
            "effect": "deny",
            "reasons": [{"policy": "p=1", "reason": reason}],
            "policy_ids": ["p=1", "p|2"],
            "policy_version": "v1",
        },
        "outcome": {"status": "denied", "latency_ms": 1.5, "upstream_status": None, "error": None},
        "seq": 42,
        "prev_hash": "a" * 64,
        "hash": "b" * 64,
    }


def _cef_unescape_header(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """A CEF parser written from the spec, not from the encoder: seven header fields split on
    unescaped pipes, then `key=value` pairs where a key starts at an unescaped `=`'s last word."""
    assert "\n" not in line and "\r" not in line
    fields, cur, i = [], "", 0
    while len(fields) < 7:
        c = line[i]
        if c == "\\":
            cur += line[i : i + 2]
            i += 2
            continue
        if c == "|":
            fields.append(_cef_unescape_header(cur))
            cur = ""
        else:
            cur += c
        i += 1
    ext = line[i:]
    eqs, j = [], 0
    while j < len(ext):  # the unescaped '=' signs: each ends a key
        if ext[j] == "\\":
            j += 2
            continue
        if ext[j] == "=":
            eqs.append(j)
        j += 1
    starts = [(ext.rfind(" ", 0, p) + 1, p) for p in eqs]
    pairs: dict[str, str] = {}
    for n, (ks, p) in enumerate(starts):
        end = starts[n + 1][0] - 1 if n + 1 < len(starts) else len(ext)
        raw = ext[p + 1 : end]
        value = re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), raw)
        pairs[ext[ks:p]] = value
    return fields, pairs


_KEYS = {
    "rt", "externalId", "deviceExternalId", "cn1Label", "cn1", "cs2Label", "cs2", "cs3Label", "cs3",
    "suser", "cs1Label", "cs1", "app", "destinationServiceName", "flexString2Label",
    "flexString2", "act", "outcome", "reason", "cs4Label", "cs4", "cs5Label", "cs5", "cs6Label", "cs6",
    "flexString1Label", "flexString1", "cn2Label", "cn2",
}  # fmt: skip


@pytest.mark.parametrize("hostile", HOSTILE)
def test_cef_keeps_hostile_values_inside_their_fields(hostile: str) -> None:
    line = cef_line(_doc(tool=hostile, reason=hostile, user=hostile))
    header, ext = parse_cef(line)
    assert header[:3] == ["CEF:0", "Bastion", "Bastion"] and header[4] == "call_tool:deny"
    assert header[6] == "7"
    assert set(ext) <= _KEYS, set(ext) - _KEYS
    assert ext["act"] == "deny" and ext["outcome"] == "denied" and ext["cn1"] == "42"
    assert ext["cs2"] == "b" * 64 and ext["cs3"] == "a" * 64 and ext["deviceExternalId"] == "replica-1"
    assert ext["cs5"] == "c|1=x" and ext["cs4"] == "p=1,p|2"
    printable = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in hostile if c not in "\r\n")
    if hostile.isprintable():
        assert ext["suser"] == hostile and ext["flexString2"] == hostile
        assert header[5] == f"call_tool demo/{hostile} deny"
    else:
        # Line breaks come back as themselves; other control characters as visible \uXXXX text.
        assert ext["suser"].replace("\n", "").replace("\r", "") == printable


def test_cef_bounds_a_huge_value() -> None:
    line = cef_line(_doc(tool="x" * 100_000, reason="y" * 100_000))
    assert len(line) < 6000


def test_ocsf_and_hec_carry_the_chain_position() -> None:
    doc = _doc("echo", "ok")
    event = ocsf_event(doc)
    assert event["unmapped"]["seq"] == 42 and event["unmapped"]["hash"] == "b" * 64
    assert event["unmapped"]["prev_hash"] == "a" * 64 and event["unmapped"]["instance"] == "replica-1"
    text = json.dumps(doc, separators=(",", ":"))
    hec = json.loads(render("splunk-hec", "replica-1", 42, text).line)
    assert (
        hec["event"] == doc and hec["host"] == "replica-1" and hec["time"] == pytest.approx(1796202000.123456)
    )


@pytest.mark.parametrize("hostile", HOSTILE)
def test_a_syslog_frame_holds_one_message_whatever_the_values(hostile: str) -> None:
    doc = _doc(tool=hostile, reason=hostile)
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    event = render("jsonl", hostile, 42, text)
    event = dataclasses.replace(event, record_id=hostile, hash=hostile)
    framed = frame(message(event, 13))
    length, _, rest = framed.partition(b" ")
    assert int(length) == len(rest)  # bytes, not characters
    parsed = parse_syslog(rest)
    assert parsed["pri"] == 13 * 8 + 4 and parsed["app"] == "bastion" and parsed["msgid"] == "audit"
    assert re.fullmatch(r"[\x21-\x7e]+", parsed["hostname"])
    assert parsed["sd"]["instance"] == hostile and parsed["sd"]["id"] == hostile
    assert parsed["sd"]["hash"] == hostile and parsed["sd"]["seq"] == "42"
    assert parsed["msg"] == text
