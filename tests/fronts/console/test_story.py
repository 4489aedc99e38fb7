"""One call's story (`/console/calls/{id}`) and its verification, through real HTTP.

The tests that change the audit store (a pending row, a checkpoint signed here, a forged one, an
edited record) each act on records they make themselves, and come last: the fixture is per
module, so nothing outside this file sees those changes.
"""

from __future__ import annotations

import html
import json
import re
import sqlite3
import uuid
from dataclasses import replace
from typing import Any

import httpx

from audit.checkpoint import CheckpointSigner, load_private_key
from gateway.fronts.console.html import esc

from .conftest import HOSTILE_TEXT, HOSTILE_TOOL, ConsoleEnv


def _by_id(page: str, ident: str) -> str:
    """The inner HTML of the element with this id (elements that do not nest their own tag)."""
    found = re.search(rf'<(\w+)[^>]*\bid="{re.escape(ident)}"[^>]*>(.*?)</\1>', page, re.S)
    assert found, f"no element with id {ident!r}"
    return found.group(2)


def _text(page: str, ident: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", _by_id(page, ident))).strip()


def _checks(page: str) -> dict[str, str]:
    """Verification rows: check name -> ok / failed / note."""
    rows = re.findall(r'<tr id="check-([\w-]+)"><td>[^<]*</td><td class="\w+">(\w+)</td>', page)
    return dict(rows)


async def _doc(env: ConsoleEnv, record_id: str) -> dict[str, Any]:
    assert env.gw.store is not None
    text = await env.gw.store.get(record_id)
    assert text is not None
    doc: dict[str, Any] = json.loads(text)
    return doc


async def _fresh(env: ConsoleEnv, http: httpx.AsyncClient, text: str) -> str:
    """A new allowed call's audit id (chained once the response is back: strict durability)."""
    r = await env.call(http, "echo", {"text": text}, sub="story")
    assert r.status_code == 200, r.text
    audit_id: str = r.json()["audit_id"]
    return audit_id


def _no_inline_code(page: str) -> None:
    """What the CSP would refuse, and ids the browser tests could not rely on."""
    assert " style=" not in page and "<script>" not in page
    ids = re.findall(r'\bid="([^"]*)"', page)
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline script"


async def test_the_denied_call_names_its_policy_reason_and_source(console_env: ConsoleEnv) -> None:
    env = console_env
    assert env.gw.policy is not None
    source = env.gw.policy.source_of("transfer-limit")
    assert source and "demo.cedar:" in source
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        r = await http.get(f"/console/calls/{env.ids['denied']}")
    assert r.status_code == 200
    page = r.text
    _no_inline_code(page)
    assert _text(page, "effect") == "deny" and _text(page, "stage") == "policy"
    reasons = _by_id(page, "reasons")
    assert "transfer-limit" in reasons and "transfers above 1000 need a human" in reasons
    assert esc(source) in reasons
    sources = _by_id(page, "policy-sources")
    assert esc(source) in sources and "forbid" in sources and "@id(&quot;transfer-limit&quot;)" in sources
    assert _text(page, "policy-version") == env.gw.policy.version
    assert '"amount": 5000' in _text(page, "args") and _text(page, "status") == "denied"
    assert _text(page, "user") == "dev" and "developers" in _text(page, "replay-groups")
    assert _text(page, "target") == "demo/transfer" and _text(page, "protocol") == "http"
    stages = _by_id(page, "stages")  # every stage that ran, in order, with its verdict and time
    assert re.search(r"<td>taint</td><td>pass</td><td>[0-9.]+</td>.*<td>policy</td><td>deny</td>", stages)


async def test_the_held_call_shows_its_approval(console_env: ConsoleEnv) -> None:
    env = console_env
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        page = (await http.get(f"/console/calls/{env.ids['held']}")).text
    _no_inline_code(page)
    assert _text(page, "effect") == "approval_required"
    assert "approval (from transfers-need-approval)" in _text(page, "obligations")
    trail = _by_id(page, "approval-trail")
    assert env.ids["approval"] in trail and "held this call" in trail and "pending" in trail
    assert 'href="/console/approvals"' in page
    assert "transfers-need-approval" in _by_id(page, "policy-sources")


async def test_the_trail_follows_an_approval_to_the_call_that_used_it(console_env: ConsoleEnv) -> None:
    env = console_env
    assert env.gw.approvals is not None
    to = f"acct-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        held = await env.call(http, "transfer", {"amount": 300, "to": to}, sub="story-payer")
        assert held.status_code == 202, held.text
        held_id, approval = held.json()["audit_id"], held.json()["approval_id"]
        await env.gw.approvals.decide(approval, True, "root", "fine <b>by me</b>")
        used = await env.call(http, "transfer", {"amount": 300, "to": to}, sub="story-payer")
        assert used.status_code == 200, used.text
        used_id = used.json()["audit_id"]
        first = (await http.get(f"/console/calls/{held_id}")).text
        second = (await http.get(f"/console/calls/{used_id}")).text
    for page in (first, second):
        _no_inline_code(page)
        trail = _by_id(page, "approval-trail")
        assert approval in trail and "consumed" in trail and "root" in trail
        assert "fine &lt;b&gt;by me&lt;/b&gt;" in trail and "<b>by me" not in page
        assert ">approved</a>" in trail  # the approval's own audit record
    assert "held this call" in _by_id(first, "approval-trail")
    assert f'href="/console/calls/{used_id}"' in _by_id(first, "approval-trail")
    assert "used by this call" in _by_id(second, "approval-trail")
    assert f'href="/console/calls/{held_id}"' in _by_id(second, "approval-trail")
    assert _text(second, "effect") == "allow" and _text(second, "stage") == "approval"
    assert "approval_required" in _text(second, "policy-verdict")


async def test_an_echo_call_shows_its_outcome_and_where_it_sits(console_env: ConsoleEnv) -> None:
    env = console_env
    doc = await _doc(env, env.ids["echo-0"])
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        page = (await http.get(f"/console/calls/{env.ids['echo-0']}")).text
    _no_inline_code(page)
    assert _text(page, "status") == "completed" and _text(page, "effect") == "allow"
    assert doc["result_sha256"] and _text(page, "result-sha256") == doc["result_sha256"]
    assert _text(page, "latency").endswith(" ms") and _text(page, "error") == "none"
    assert _text(page, "chain-seq") == str(doc["seq"]) and _text(page, "chain-hash") == doc["hash"]
    assert _text(page, "chain-instance") == "console-test"
    assert _text(page, "chain-prev-hash") == (doc["prev_hash"] or "none")
    assert (
        "echo-daily" in _by_id(page, "budget-charges")
        and json.loads(_text(page, "budget-recorded")) == doc["budget"]
    )
    assert '"text": "hello 0"' in _text(page, "args")
    form = re.search(r'<form method="post" action="([^"]+)" id="verify-form">(.*?)</form>', page, re.S)
    assert form and form.group(1) == f"/console/calls/{env.ids['echo-0']}/verify"
    assert "Verify this record" in form.group(2) and 'name="csrf"' not in form.group(2)  # Bearer: none


async def test_records_of_the_same_call_are_listed_together(console_env: ConsoleEnv) -> None:
    env = console_env
    call_id = f"corr-{uuid.uuid4().hex}"
    ids = []
    async with httpx.AsyncClient(base_url=env.base, timeout=10) as http:
        for sub in ("corr-a", "corr-b"):  # idempotency is per principal: both run
            body = {"upstream": "demo", "tool": "echo", "arguments": {"text": sub}, "call_id": call_id}
            headers = {"authorization": f"Bearer {env.token(sub)}", "x-bastion-client": "story-test/1.0"}
            r = await http.post(f"{env.base}/v1/tool-calls", json=body, headers=headers)
            assert r.status_code == 200, r.text
            ids.append(r.json()["audit_id"])
        page = (await http.get(f"/console/calls/{ids[0]}", headers=env.admin())).text
    assert _text(page, "call-id") == call_id and _text(page, "client") == "story-test/1.0"
    same = _by_id(page, "same-call")
    assert f'href="/console/calls/{ids[1]}"' in same and "this record" in same
    assert f'href="/console/audit?call_id={call_id}"' in page


async def test_hostile_records_render_as_text(console_env: ConsoleEnv) -> None:
    env = console_env
    assert env.ids["hostile-tool"], "the call with an HTML tool name has its audit record"
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        args = (await http.get(f"/console/calls/{env.ids['hostile-args']}")).text
        tool = (await http.get(f"/console/calls/{env.ids['hostile-tool']}")).text
        checked = (await http.post(f"/console/calls/{env.ids['hostile-tool']}/verify")).text
    for page in (args, tool, checked):
        _no_inline_code(page)
        assert "<img src=x" not in page and "<b onmouseover" not in page
    assert "&lt;script&gt;alert(" in args and "&lt;img src=x onerror=alert(1)&gt;" in args
    assert json.loads(_text(args, "args")) == {"text": HOSTILE_TEXT} and _text(args, "user") == "mallory"
    assert "&lt;b onmouseover=alert(1)&gt;" in tool and _text(tool, "target") == f"demo/{HOSTILE_TOOL}"
    assert "&lt;b onmouseover=alert(1)&gt;" in checked


async def test_an_untouched_record_verifies(console_env: ConsoleEnv) -> None:
    env = console_env
    doc = await _doc(env, env.ids["echo-1"])
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        r = await http.post(f"/console/calls/{env.ids['echo-1']}/verify")  # Bearer: no csrf token needed
    assert r.status_code == 200
    assert _text(r.text, "verify-result").startswith("ok")
    checks = _checks(r.text)
    assert {k: checks[k] for k in ("hash", "index", "previous", "next")} == dict.fromkeys(
        ("hash", "index", "previous", "next"), "ok"
    )
    assert checks["checkpoint"] in ("ok", "note")  # the writer signs one every 10 s: maybe not yet
    assert "failed" not in checks.values()
    assert _text(r.text, "chain-seq") == str(doc["seq"])  # and the story follows
    assert doc["hash"] in _by_id(r.text, "check-hash")


async def test_unknown_ids_are_404(console_env: ConsoleEnv) -> None:
    env = console_env
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        missing = await http.get("/console/calls/0190aaaa-0000-7000-8000-000000000000")
        assert missing.status_code == 404 and "No audit record" in missing.text
        long = await http.get("/console/calls/" + "a" * 300)
        assert long.status_code == 404 and "a" * 65 not in long.text and "a" * 64 + "…" in long.text
        hostile = await http.get("/console/calls/%3Cscript%3Ex")
        assert (
            hostile.status_code == 404
            and "<script>x" not in hostile.text
            and "&lt;script&gt;x" in hostile.text
        )
        post = await http.post("/console/calls/0190aaaa-0000-7000-8000-000000000000/verify")
        assert post.status_code == 404


async def test_a_pending_record_is_not_chained_yet(console_env: ConsoleEnv) -> None:
    env = console_env
    pending = str(uuid.uuid4())
    doc = await _doc(env, env.ids["echo-2"])
    doc |= {"id": pending, "seq": None, "prev_hash": None, "hash": None, "result_sha256": None}
    doc["outcome"] = {"status": "pending", "latency_ms": None, "upstream_status": None, "error": None}
    with sqlite3.connect(env.root / "audit.db", timeout=10) as db:  # a call in flight, as `begin` leaves it
        db.execute(
            'INSERT INTO audit_records (id, ts, schema_version, instance, "user", tenant, agent, upstream, '
            "tool, action, effect, status, prev_hash, hash, record, seq, call_id, protocol) "
            'SELECT ?, ts, schema_version, instance, "user", tenant, agent, upstream, tool, action, effect, '
            "'pending', NULL, NULL, ?, NULL, call_id, protocol FROM audit_records WHERE id = ?",
            (pending, json.dumps(doc), env.ids["echo-2"]),
        )
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        r = await http.post(f"/console/calls/{pending}/verify")
    assert r.status_code == 200
    assert _text(r.text, "verify-result").startswith("not chained yet")
    assert _checks(r.text) == {"chain": "note"}
    assert _text(r.text, "chain-seq") == "not chained yet (pending)" and _text(r.text, "status") == "pending"


async def test_a_signed_checkpoint_covers_the_record(console_env: ConsoleEnv) -> None:
    env = console_env
    assert env.gw.store is not None
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        first = await _fresh(env, http, "before the checkpoint")
        second = await _fresh(env, http, "at the checkpoint")
        doc = await _doc(env, second)
        signer = CheckpointSigner(load_private_key(env.root / "audit-signing.key"))
        await env.gw.store.apply(
            checkpoints=[signer.sign("console-test", doc["seq"], doc["hash"], "periodic")]
        )
        at = await http.post(f"/console/calls/{second}/verify")
        before = await http.post(f"/console/calls/{first}/verify")
    assert _checks(at.text)["checkpoint"] == "ok"
    assert f"checkpoint at seq {doc['seq']}" in _text(at.text, "check-checkpoint")
    assert "this record's hash is the checkpoint's" in _text(at.text, "check-checkpoint")
    assert f"key {signer.key_id}" in _text(at.text, "check-checkpoint")
    walked = _text(before.text, "check-checkpoint")
    assert _checks(before.text)["checkpoint"] == "ok" and "walked" in walked and "signature ok" in walked
    assert _text(before.text, "verify-result").startswith("ok")


async def test_a_forged_checkpoint_is_caught(console_env: ConsoleEnv) -> None:
    env = console_env
    assert env.gw.store is not None
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        record = await _fresh(env, http, "under a forged checkpoint")
        doc = await _doc(env, record)
        signer = CheckpointSigner(load_private_key(env.root / "audit-signing.key"))
        # a real signature over this record's head, moved onto another hash
        forged = replace(signer.sign("console-test", doc["seq"], doc["hash"], "periodic"), hash="0" * 64)
        await env.gw.store.apply(checkpoints=[forged])
        r = await http.post(f"/console/calls/{record}/verify")
    assert _checks(r.text)["checkpoint"] == "failed"
    why = _text(r.text, "check-checkpoint")
    assert "differs from the signed checkpoint" in why and "bad signature" in why
    assert _text(r.text, "verify-result").startswith("failed")


async def test_an_edited_record_fails_verification(console_env: ConsoleEnv) -> None:
    env = console_env
    marker = f"tamper-me-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        record = await _fresh(env, http, marker)
        ok = await http.post(f"/console/calls/{record}/verify")
        assert _checks(ok.text)["hash"] == "ok"
        with sqlite3.connect(env.root / "audit.db", timeout=10) as db:
            changed = db.execute(
                "UPDATE audit_records SET record = replace(record, ?, ?) WHERE id = ?",
                (marker, marker.replace("tamper-me", "tampered!"), record),
            ).rowcount
        assert changed == 1
        r = await http.post(f"/console/calls/{record}/verify")
        story = await http.get(f"/console/calls/{record}")
    assert r.status_code == 200
    assert _checks(r.text)["hash"] == "failed"
    assert _text(r.text, "verify-result").startswith("failed: the record does not match its hash")
    assert _checks(r.text)["previous"] == "ok"  # only the edited record itself is at fault
    assert "tampered!" in _text(story.text, "args")  # the story shows what is stored now
