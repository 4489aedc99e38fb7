"""AutoGen tools through a real Bastion, run by AutoGen's own StaticWorkbench."""

from __future__ import annotations

from typing import Any

import pytest
from adapters_support import api_token, records, unique

from gateway.app import Gateway

pytest.importorskip("autogen_core", reason="autogen-core is not installed (pip install 'bastion[autogen]')")

from autogen_core import CancellationToken
from autogen_core.tools import StaticWorkbench

from adapters.autogen import CLIENT_INFO, autogen_tools
from adapters.client import AsyncBastionClient, ToolDenied


async def test_workbench_calls_through_bastion_and_denials_are_error_results(
    gateway: tuple[str, Gateway], dev_key: Any
) -> None:
    base, gw = gateway
    sub = unique("autogen")
    async with AsyncBastionClient(base, api_token(dev_key, base, sub)) as client:
        tools = await autogen_tools(client, "demo")
        assert "delete_note" not in {t.name for t in tools}
        bench = StaticWorkbench(tools)
        ok = await bench.call_tool("add", {"a": 5, "b": 6}, call_id="ag-1")
        denied = await bench.call_tool("transfer", {"amount": 5000, "to": "x"}, call_id="ag-2")
        bad_args = await bench.call_tool("add", {"a": "five"}, call_id="ag-3")
        by_name = {t.name: t for t in tools}
        with pytest.raises(ToolDenied):
            await by_name["transfer"].run_json({"amount": 2000, "to": "y"}, CancellationToken())
    assert not ok.is_error and ok.to_text() == "11"
    assert denied.is_error and "denied by policy transfer-limit" in denied.to_text()
    assert bad_args.is_error  # refused by the schema before reaching Bastion
    rows = await records(gw, sub)
    by_call = {r.call_id: r for r in rows}
    assert by_call["ag-1"].outcome["status"] == "completed" and by_call["ag-2"].effect == "deny"
    assert "ag-3" not in by_call and len(rows) == 3
    assert {r.client for r in rows} == {CLIENT_INFO} and CLIENT_INFO.startswith("autogen/")
