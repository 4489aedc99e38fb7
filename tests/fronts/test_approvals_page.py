"""The approval page at `/approvals/{id}`: never framed, nothing loaded from elsewhere, and its form
accepted only from Bastion's own origin (`Origin: null` included among the refused)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import POLICIES, free_port, make_config, running, running_gateway
from test_approvals import EXECUTED, POLICY, bank_server

from gateway.identity.devkeys import DevKey


class Page:
    def __init__(self, base: str, key: DevKey) -> None:
        self.base, self.key = base, key

    def admin(self, sub: str = "root") -> dict[str, str]:
        return {"authorization": f"Bearer {self.key.mint(sub, audience=self.base, groups=['admins'])}"}

    async def held(self, http: httpx.AsyncClient, amount: int) -> str:
        token = self.key.mint("fin", audience=f"{self.base}/mcp/bank", groups=["finance"])
        body = {"upstream": "bank", "tool": "pay", "arguments": {"amount": amount, "to": "page"}}
        resp = await http.post(
            f"{self.base}/v1/tool-calls", json=body, headers={"authorization": f"Bearer {token}"}
        )
        assert resp.status_code == 202, resp.text
        return str(resp.json()["approval_id"])

    async def status(self, http: httpx.AsyncClient, approval: str) -> str:
        shown = await http.get(f"{self.base}/v1/approvals/{approval}", headers=self.admin())
        return str(shown.json()["status"])


@pytest.fixture(scope="module")
async def page(
    data_dir: Path, dev_key: DevKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Page]:
    tmp = tmp_path_factory.mktemp("approvals-page")
    policies = tmp / "policies"
    policies.mkdir()
    for name in ("schema.cedarschema", "demo.cedar"):
        (policies / name).write_text((POLICIES / name).read_text())
    (policies / "bank.cedar").write_text(POLICY)
    app = bank_server().streamable_http_app(streamable_http_path="/mcp")
    async with running(app, lifespan="on") as url:
        cfg = make_config(
            data_dir,
            {"bank": f"{url}/mcp"},
            free_port(),
            policies,
            admin={"groups": ["admins"]},
            audit={"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"},
            state={"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"},
        )
        async with running_gateway(cfg) as (base, _):
            yield Page(base, dev_key)


def assert_unframable(resp: httpx.Response) -> None:
    assert resp.headers["x-frame-options"] == "DENY"
    csp = resp.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert resp.headers["cache-control"] == "no-store"


async def test_every_page_answer_forbids_framing(page: Page, http: httpx.AsyncClient) -> None:
    approval = await page.held(http, 601)
    shown = await http.get(f"{page.base}/approvals/{approval}", headers=page.admin())
    assert shown.status_code == 200
    assert_unframable(shown)
    # the CSP allows the page's own inline style, by its hash, and nothing else
    style = re.search(r"<style>(.*?)</style>", shown.text, re.S)
    assert style is not None
    digest = base64.b64encode(hashlib.sha256(style.group(1).encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in shown.headers["content-security-policy"]
    assert "<script" not in shown.text

    for refused in (
        await http.get(f"{page.base}/approvals/{approval}"),  # no token: 401
        await http.get(f"{page.base}/approvals/no-such-id", headers=page.admin()),  # 404
    ):
        assert refused.status_code in (401, 404)
        assert_unframable(refused)


@pytest.mark.parametrize(
    ("amount", "headers"),
    [
        (611, {"origin": "null"}),
        (612, {"origin": "https://evil.example"}),
        (613, {"sec-fetch-site": "cross-site"}),
    ],
    ids=["origin-null", "foreign-origin", "cross-site-fetch"],
)
async def test_a_form_post_from_elsewhere_is_refused_and_the_approval_stays_pending(
    page: Page, http: httpx.AsyncClient, amount: int, headers: dict[str, str]
) -> None:
    before = len(EXECUTED)
    approval = await page.held(http, amount)
    shown = await http.get(f"{page.base}/approvals/{approval}", headers=page.admin())
    token = shown.text.split('name="token" value="')[1].split('"')[0]
    form = {"token": token, "decision": "approve", "reason": "looks fine"}
    url = f"{page.base}/approvals/{approval}"

    refused = await http.post(url, data=form, headers=page.admin() | headers)
    assert refused.status_code == 403, refused.text
    assert "cross-origin form posts are refused" in refused.text
    assert_unframable(refused)
    assert await page.status(http, approval) == "pending"
    assert len(EXECUTED) == before

    own = await http.post(url, data=form, headers=page.admin() | {"origin": page.base})
    assert own.status_code == 200 and "approved by root" in own.text
    assert await page.status(http, approval) == "approved"
