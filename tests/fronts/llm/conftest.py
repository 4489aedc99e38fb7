"""A real Bastion in front of the provider double (both APIs), the demo MCP upstream beside it.

Policies for the model's tools (`Tool::"llm/<name>"`), on top of the repo's:
- developers may call any of them;
- `delete_file` is forbidden (`no-file-deletion`);
- `refund` above 100 needs a human (`big-refunds-need-approval`);
- `send_email` is forbidden once the conversation is tainted by prompt injection;
- the model's `say` is mapped to the MCP tool `demo/echo`.
A budget allows two `web_search` calls a day per user. Redaction replaces e-mail addresses and
US SSNs in the model's tool arguments and in tool results.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from audit.record import AuditRecord
from gateway.app import Gateway
from gateway.identity.devkeys import DevKey, ensure_dev_key
from tests.conftest import POLICIES, audit_records, dead_url, free_port, make_config, running_gateway
from tests.llm_provider import MODEL_TOOL_POLICIES, ProviderDouble, running_provider

PROVIDER_KEY = "sk-bastion-own-provider-key"


@dataclass
class LLMEnv:
    base: str
    gw: Gateway
    provider: ProviderDouble
    provider_url: str
    key: DevKey

    def token(self, sub: str = "dev", groups: tuple[str, ...] = ("developers",), **kw: Any) -> str:
        kw.setdefault("audience", self.base)
        return self.key.mint(sub, groups=groups, **kw)

    def anthropic(self, token: str | None = None, **kw: Any) -> Any:
        import anthropic

        kw.setdefault("max_retries", 0)
        return anthropic.AsyncAnthropic(
            base_url=f"{self.base}/llm/anthropic", api_key=token or self.token(), **kw
        )

    def openai(self, token: str | None = None, **kw: Any) -> Any:
        import openai

        kw.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=f"{self.base}/llm/openai/v1", api_key=token or self.token(), **kw)

    async def records(self, **where: Any) -> list[AuditRecord]:
        return await audit_records(self.gw.cfg.audit.url, **where)


@pytest.fixture(scope="session")
async def llm_env(tmp_path_factory: pytest.TempPathFactory, upstream_url: str) -> AsyncIterator[LLMEnv]:
    home = tmp_path_factory.mktemp("llm")
    key = ensure_dev_key(home)
    policies = home / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "llm.cedar").write_text(MODEL_TOOL_POLICIES)
    os.environ["BASTION_TEST_PROVIDER_KEY"] = PROVIDER_KEY
    async with running_provider() as (double, url):
        credential = {"from_env": "BASTION_TEST_PROVIDER_KEY"}
        llm = {
            "providers": {
                "anthropic": {
                    "kind": "anthropic",
                    "url": url,
                    "credential": {"header": "x-api-key", **credential},
                },
                "openai": {
                    "kind": "openai",
                    "url": url,
                    "credential": {"header": "authorization", "prefix": "Bearer ", **credential},
                },
                "slow": {"kind": "anthropic", "url": url, "timeout_s": 0.5},
                "down": {"kind": "openai", "url": dead_url().removesuffix("/mcp")},
            },
            "tools": {"map": {"say": "demo/echo"}},
        }
        redaction = {
            "entities": ["EMAIL_ADDRESS", "US_SSN"],
            "default": {"arguments": "none", "results": "replace"},
            "tools": {"llm/*": {"arguments": "replace"}},
        }
        cfg = make_config(
            home,
            {"demo": upstream_url},
            free_port(),
            policies,
            llm=llm,
            redaction=redaction,
            admin={"groups": ["admins"]},
            budgets=[
                {"name": "searches", "match": {"tools": ["llm/web_search"]}, "limit": 2, "window": "1d"}
            ],
        )
        async with running_gateway(cfg) as (base, gw):
            yield LLMEnv(base, gw, double, url, key)


@pytest.fixture
def env(llm_env: LLMEnv) -> LLMEnv:
    llm_env.provider.clear()
    return llm_env


def tool_ids(records: list[AuditRecord]) -> Callable[[str], list[AuditRecord]]:
    def of(call_id: str) -> list[AuditRecord]:
        return [r for r in records if r.call_id == call_id]

    return of


__all__ = ["LLMEnv", "Path"]
