"""Approval webhooks: signed, retried while a retry can help, one delivery id across attempts."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import running
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import metrics
from gateway.call import Principal, ToolCall
from gateway.config import ApprovalsConfig, ApprovalWebhookConfig
from gateway.state import approvals as approvals_mod
from gateway.state.approvals import Approvals
from gateway.state.db import open_state

KEY = b"webhook-retry-key"


class Receiver:
    """Answers the first `failures` attempts with `status`, then 204; keeps what it was sent."""

    def __init__(self, failures: int, status: int) -> None:
        self.failures, self.status = failures, status
        self.seen: list[tuple[str, str, bytes]] = []

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        self.seen.append(
            (request.headers["x-bastion-delivery"], request.headers["x-bastion-signature"], body)
        )
        if len(self.seen) <= self.failures:
            return Response(status_code=self.status)
        return Response(status_code=204)


@asynccontextmanager
async def _approvals(tmp_path: Path, url: str, retries: int) -> AsyncIterator[Approvals]:
    (tmp_path / "hook.key").write_bytes(KEY)
    engine = await open_state(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    hook = ApprovalWebhookConfig(url=url, secret_file=tmp_path / "hook.key", timeout_s=2, retries=retries)
    approvals = Approvals(engine, ApprovalsConfig(webhook=hook), "http://bastion.test")
    try:
        yield approvals
    finally:
        await approvals.aclose()
        await engine.dispose()


def _count(outcome: str) -> float:
    return metrics.WEBHOOK_DELIVERIES.labels(outcome)._value.get()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(approvals_mod, "RETRY_BASE_S", 0.01)


@pytest.fixture
async def receiver_app() -> AsyncIterator[tuple[str, dict[str, Receiver]]]:
    receivers: dict[str, Receiver] = {}

    async def route(request: Request) -> Response:
        return await receivers[request.path_params["name"]](request)

    async with running(Starlette(routes=[Route("/{name}", route, methods=["POST"])])) as base:
        yield base, receivers


async def _request(approvals: Approvals) -> None:
    who = Principal(sub="fin", issuer="test")
    await approvals.request(ToolCall("bank", "pay", {"amount": 500}, principal=who), [], None)


async def _settle(receiver: Receiver, attempts: int) -> None:
    for _ in range(300):
        if len(receiver.seen) >= attempts:
            await asyncio.sleep(0.05)  # nothing more should come
            return
        await asyncio.sleep(0.01)


async def test_a_failing_receiver_gets_the_same_delivery_again_until_it_takes_it(
    tmp_path: Path, receiver_app: tuple[str, dict[str, Receiver]]
) -> None:
    base, receivers = receiver_app
    receivers["flaky"] = flaky = Receiver(failures=2, status=503)
    delivered, retried = _count("delivered"), _count("retried")
    async with _approvals(tmp_path, f"{base}/flaky", retries=4) as approvals:
        await _request(approvals)
        await _settle(flaky, 3)
    assert len(flaky.seen) == 3  # two refusals, then taken: no fourth attempt
    assert len({delivery for delivery, _, _ in flaky.seen}) == 1  # one delivery id across attempts
    for _, signature, body in flaky.seen:
        assert hmac.compare_digest(signature, "sha256=" + hmac.new(KEY, body, hashlib.sha256).hexdigest())
        assert json.loads(body)["event"] == "requested"
    assert _count("delivered") == delivered + 1
    assert _count("retried") == retried + 2


async def test_a_refusal_that_a_retry_cannot_change_is_final(
    tmp_path: Path, receiver_app: tuple[str, dict[str, Receiver]]
) -> None:
    base, receivers = receiver_app
    receivers["strict"] = strict = Receiver(failures=99, status=400)
    dropped = _count("dropped")
    async with _approvals(tmp_path, f"{base}/strict", retries=4) as approvals:
        await _request(approvals)
        await _settle(strict, 1)
    assert len(strict.seen) == 1
    assert _count("dropped") == dropped + 1


async def test_retries_give_up_and_closing_does_not_wait_for_them(
    tmp_path: Path, receiver_app: tuple[str, dict[str, Receiver]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, receivers = receiver_app
    receivers["down"] = down = Receiver(failures=99, status=502)
    dropped = _count("dropped")
    async with _approvals(tmp_path, f"{base}/down", retries=2) as approvals:
        await _request(approvals)
        await _settle(down, 3)
        assert len(down.seen) == 3  # the first attempt and two retries
        assert _count("dropped") == dropped + 1

        monkeypatch.setattr(approvals_mod, "RETRY_BASE_S", 60.0)  # the next delivery backs off for long
        monkeypatch.setattr(approvals_mod, "CLOSE_GRACE_S", 0.2)
        await _request(approvals)
        await _settle(down, 4)
        started = asyncio.get_running_loop().time()
    assert asyncio.get_running_loop().time() - started < 5  # closing did not wait out the backoff
