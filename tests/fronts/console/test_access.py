"""Who gets into the console, and how: admin Bearer tokens, one-time login links from
`bastion console login`, session cookies, and forms that only the console's own pages can post."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from gateway.fronts.console.session import COOKIE

from .conftest import ConsoleEnv


async def test_only_admins_see_it(console_env: ConsoleEnv) -> None:
    async with httpx.AsyncClient(base_url=console_env.base, timeout=10) as http:
        anon = await http.get("/console/audit")
        assert anon.status_code == 401 and "bastion console login" in anon.text
        dev = await http.get("/console/audit", headers={"authorization": f"Bearer {console_env.token()}"})
        assert dev.status_code == 403
        admin = await http.get("/console/audit", headers=console_env.admin())
        assert admin.status_code == 200
        named = await http.get("/console/audit", headers=console_env.admin("root-admin", ()))
        assert named.status_code == 200
    for r in (anon, admin):
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == "no-store"


async def test_a_login_link_opens_a_session_once(console_env: ConsoleEnv) -> None:
    link = await console_env.login_link()
    path = link.removeprefix(console_env.base)
    async with httpx.AsyncClient(base_url=console_env.base, timeout=10) as http:
        first = await http.get(path)
        assert first.status_code == 303 and first.headers["location"] == "/console"
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Path=/console" in cookie
        page = await http.get("/console/audit")
        assert page.status_code == 200 and ">root<" in page.text
        async with httpx.AsyncClient(base_url=console_env.base) as other:
            again = await other.get(path)
        assert again.status_code == 401 and "used already" in again.text
        forged = await http.get(path[:-3] + "abc")
        assert forged.status_code == 401


async def test_the_cli_names_only_admins(console_env: ConsoleEnv) -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        await console_env.login_link("--user", "dev", "--group", "developers")
    assert b"not an admin" in err.value.stderr
    link = await console_env.login_link("--user", "root-admin")
    assert "/console/login?token=" in link


async def test_a_tampered_or_foreign_cookie_is_not_a_session(console_env: ConsoleEnv) -> None:
    link = await console_env.login_link()
    async with httpx.AsyncClient(base_url=console_env.base, timeout=10) as http:
        await http.get(link.removeprefix(console_env.base))
        value = http.cookies[COOKIE]
        body, _, mac = value.partition(".")
        for bad in (body + "." + mac[::-1], "x" + value, value.replace(".", "..", 1)):
            http.cookies.clear()
            http.cookies.set(COOKIE, bad, path="/console")
            r = await http.get("/console/audit")
            assert r.status_code == 401, bad


async def test_forms_need_the_sessions_token_and_the_consoles_origin(console_env: ConsoleEnv) -> None:
    link = await console_env.login_link()
    async with httpx.AsyncClient(base_url=console_env.base, timeout=10) as http:
        await http.get(link.removeprefix(console_env.base))
        page = await http.get("/console/audit")
        token = page.text.split('name="csrf" value="')[1].split('"')[0]
        no_token = await http.post("/console/logout", data={})
        assert no_token.status_code == 403 and "form token" in no_token.text
        foreign = await http.post(
            "/console/logout", data={"csrf": token}, headers={"origin": "https://evil.example"}
        )
        assert foreign.status_code == 403 and "cross-origin" in foreign.text
        cross = await http.post(
            "/console/logout", data={"csrf": token}, headers={"sec-fetch-site": "cross-site"}
        )
        assert cross.status_code == 403
        out = await http.post("/console/logout", data={"csrf": token}, headers={"origin": console_env.base})
        assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
