"""Audit search through the console: filters, key-based pages, the live tail's JSON, bad input."""

from __future__ import annotations

import re

import httpx

from .conftest import HOSTILE_TEXT, ConsoleEnv


def _ids(html: str) -> list[str]:
    return re.findall(r'href="/console/calls/([0-9a-f-]+)"', html)


async def test_filters_find_exactly_the_matching_calls(console_env: ConsoleEnv) -> None:
    env = console_env
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        everything = _ids((await http.get("/console/audit")).text)
        assert set(env.ids.values()) - {"", env.ids["approval"]} <= set(everything)
        denied = _ids((await http.get("/console/audit", params={"decision": "deny"})).text)
        assert env.ids["denied"] in denied and env.ids["echo-0"] not in denied
        by_user = _ids((await http.get("/console/audit", params={"user": "alice"})).text)
        assert by_user == [env.ids["held"]]
        by_policy = _ids((await http.get("/console/audit", params={"policy": "transfer-limit"})).text)
        assert by_policy == [env.ids["denied"]]
        by_target = _ids(
            (await http.get("/console/audit", params={"target": "demo", "tool": "transfer"})).text
        )
        assert set(by_target) == {env.ids["denied"], env.ids["held"]}
        none = await http.get("/console/audit", params={"protocol": "a2a"})
        assert _ids(none.text) == [] and "no records match" in none.text


async def test_pages_follow_the_key_newest_first(console_env: ConsoleEnv) -> None:
    env = console_env
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(60):  # more than a page
            await env.call(http, "echo", {"text": f"page {i}"}, sub="pager")
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        first = await http.get("/console/audit", params={"user": "pager"})
        older = re.search(r'href="(/console/audit\?[^"]*before=[^"]*)"', first.text)
        assert older, "a full page links to the older records"
        second = await http.get(older.group(1).replace("&amp;", "&"))
        a, b = _ids(first.text), _ids(second.text)
        assert len(a) == 50 and len(b) == 10 and not set(a) & set(b)
    assert env.gw.store is not None
    newest_first = [rid for _, rid, _ in await env.gw.store.page(100, user="pager")]
    assert a + b == newest_first


async def test_the_tail_returns_what_came_after_the_key(console_env: ConsoleEnv) -> None:
    env = console_env
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        page = await http.get("/console/audit", params={"user": "tailer"})
        assert "data-tail" not in page.text  # nothing yet: the tail starts once there is a record
        await env.call(http, "echo", {"text": "t0"}, sub="tailer")
        page = await http.get("/console/audit", params={"user": "tailer"})
        cursor = re.search(r'data-tail="([^"]+)"', page.text)
        assert cursor
        await env.call(http, "echo", {"text": "t1"}, sub="tailer")
        await env.call(http, "transfer", {"amount": 9999, "to": "x"}, sub="tailer")
        tail = (
            await http.get("/console/audit/tail", params={"user": "tailer", "after": cursor.group(1)})
        ).json()
        assert [r["effect"] for r in tail["rows"]] == ["allow", "deny"]
        again = (
            await http.get("/console/audit/tail", params={"user": "tailer", "after": tail["cursor"]})
        ).json()
        assert again["rows"] == []


async def test_bad_filters_are_named_and_hostile_values_are_text(console_env: ConsoleEnv) -> None:
    env = console_env
    async with httpx.AsyncClient(base_url=env.base, timeout=10, headers=env.admin()) as http:
        bad = await http.get("/console/audit", params={"since": "yesterday"})
        assert bad.status_code == 400 and "since: not a date" in bad.text
        bad = await http.get("/console/audit", params={"decision": "<x>"})
        assert bad.status_code == 400 and "&lt;x&gt;" not in bad.text and "decision: one of" in bad.text
        bad = await http.get("/console/audit", params={"user": "u" * 300})
        assert bad.status_code == 400
        bad = await http.get("/console/audit/tail", params={"after": "garbage"})
        assert bad.status_code == 400
        echoed = await http.get("/console/audit", params={"user": '"><script>alert(1)</script>'})
        assert "<script>alert(1)" not in echoed.text and "&lt;script&gt;" in echoed.text
        story = await http.get(f"/console/calls/{env.ids['hostile-args']}")
        assert HOSTILE_TEXT not in story.text and "&lt;script&gt;" in story.text
