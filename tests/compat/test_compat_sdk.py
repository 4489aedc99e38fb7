"""The official TypeScript SDKs through Bastion: v1 (2025-11-25) and v2 in each of its modes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .conftest import Clients, assert_scenario

pytestmark = pytest.mark.timeout(300)  # the first test may install the clients (npm ci)

UPSTREAMS = ["demo", "legacy"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
async def test_sdk_v1(
    clients: Clients, mcp_url: Callable[[str], str], token: Callable[..., str], upstream: str
) -> None:
    report = (await clients.driver("sdk_v1.mjs", mcp_url(upstream), token(upstream=upstream))).json()
    assert_scenario(report)
    assert report["sessionId"], "a 2025 client gets an Mcp-Session-Id from Bastion"
    assert report["sessionId"].startswith("v1."), "the session id is Bastion's, not the upstream's"


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize(
    ("mode", "era"), [("legacy", "legacy"), ("auto", "modern"), ("2026-07-28", "modern")]
)
async def test_sdk_v2(
    clients: Clients,
    mcp_url: Callable[[str], str],
    token: Callable[..., str],
    upstream: str,
    mode: str,
    era: str,
) -> None:
    report = (await clients.driver("sdk_v2.mjs", mcp_url(upstream), token(upstream=upstream), mode)).json()
    assert_scenario(report)
    assert report["era"] == era, report
    if era == "modern":
        assert report["sessionId"] is None and report["protocolVersion"] == "2026-07-28", report
    else:
        assert report["sessionId"], report


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize(("mode", "version"), [("discover", "2026-07-28"), ("legacy", "2025-11-25")])
async def test_ai_sdk(
    clients: Clients,
    mcp_url: Callable[[str], str],
    token: Callable[..., str],
    upstream: str,
    mode: str,
    version: str,
) -> None:
    run = await clients.driver(
        "ai_sdk.mjs", mcp_url(upstream), token(upstream=upstream), mode, node=clients.node22
    )
    report = run.json()
    assert_scenario(report)
    assert report["protocolVersion"] == version, report
