"""Operations: /metrics moves as calls pass, /readyz says what is wrong, logs keep no secret."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import dead_url, free_port, make_config, running_gateway
from mcp_support import modern_call, modern_headers
from prometheus_client.parser import text_string_to_metric_families

from gateway import config as config_mod
from gateway import logs
from gateway.app import Gateway
from gateway.errors import ConfigError
from gateway.identity.devkeys import DevKey

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PLANTED = "sk_live_PLANTED0secret0value0do0not0log"
REPO = Path(__file__).resolve().parent.parent


async def scrape(http: httpx.AsyncClient, base: str) -> Samples:
    """Every sample of `/metrics`, parsed with prometheus-client's own parser."""
    response = await http.get(f"{base}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def call(
    http: httpx.AsyncClient, base: str, token: str, tool: str, args: dict[str, Any], upstream: str = "demo"
) -> dict[str, Any]:
    response = await http.post(
        f"{base}/mcp/{upstream}",
        json=modern_call(tool, args),
        headers=modern_headers(token, "tools/call", tool),
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_metrics_move_as_calls_pass(
    gateway: tuple[str, Gateway], token: Callable[..., str], http: httpx.AsyncClient
) -> None:
    base, _ = gateway
    before = await scrape(http, base)
    for i in range(3):
        body = await call(http, base, token(), "echo", {"text": f"hi {i}"})
        assert body["result"]["isError"] is False
    denied = await call(http, base, token(), "transfer", {"amount": 5000, "to": "mallory"})
    assert denied["result"]["isError"] is True
    after = await scrape(http, base)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    allow = {"effect": "allow", "upstream": "demo", "tool": "echo"}
    assert delta("bastion_decisions_total", **allow) == 3
    assert delta("bastion_decisions_total", effect="deny", upstream="demo", tool="transfer") == 1
    assert delta("bastion_stage_seconds_count", stage="policy") == 4
    assert delta("bastion_stage_seconds_count", stage="identity") >= 4
    assert delta("bastion_stage_seconds_count", stage="audit") == 4
    assert delta("bastion_upstream_seconds_count", upstream="demo") == 3
    assert value(after, "bastion_upstream_seconds_bucket", upstream="demo", le="+Inf") >= 3
    assert value(after, "bastion_inflight_calls") == 0
    assert ("bastion_audit_backlog", frozenset()) in after
    assert delta("bastion_mcp_requests_total", method="POST", status="200") == 4


async def test_unreachable_upstream_counts_as_upstream_error(
    tmp_path: Path, dev_key: DevKey, policy_dir: Path, http: httpx.AsyncClient
) -> None:
    shutil.copy(dev_key.jwks_path, tmp_path / "dev-jwks.json")
    dead = dead_url()
    cfg = make_config(tmp_path, {"legacy": dead}, free_port(), policy_dir)
    async with running_gateway(cfg) as (base, _):
        tok = dev_key.mint("dev", audience=f"{base}/mcp/legacy", groups=["developers"])
        before = await scrape(http, base)
        response = await http.post(
            f"{base}/mcp/legacy",
            json=modern_call("echo", {"text": "x"}),
            headers=modern_headers(tok, "tools/call", "echo"),
        )
        assert response.status_code >= 400 or "error" in response.json()
        after = await scrape(http, base)
    kind = {"upstream": "legacy", "kind": "transport"}
    assert (
        value(after, "bastion_upstream_errors_total", **kind)
        - value(before, "bastion_upstream_errors_total", **kind)
        == 1
    )


def test_tool_label_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import metrics

    monkeypatch.setattr(metrics, "_tool_labels", set())
    monkeypatch.setattr(metrics, "MAX_TOOL_LABELS", 2)
    assert metrics.tool_label("u", "a") == "a"
    assert metrics.tool_label("u", "b") == "b"
    assert metrics.tool_label("u", "c") == metrics.OTHER
    assert metrics.tool_label("u", "a") == "a"


def test_metrics_add_up_across_processes(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, two worker processes' counters are summed by the exposition."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = (
        "from gateway import metrics\n"
        "from gateway.call import Decision\n"
        "metrics.known_upstreams(['demo'])\n"
        "for _ in range(N): metrics.decided('demo', 'echo', Decision('allow'))\n"
    )
    for n in (2, 3):
        subprocess.run([sys.executable, "-c", f"N = {n}\n" + worker], env=env, check=True, cwd=REPO)
    scrape_code = "import sys\nfrom gateway import metrics\nsys.stdout.write(metrics.exposition().decode())\n"
    out = subprocess.run(
        [sys.executable, "-c", scrape_code], env=env, check=True, cwd=REPO, capture_output=True, text=True
    ).stdout
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(out)
        for s in f.samples
    }
    assert value(samples, "bastion_decisions_total", effect="allow", upstream="demo", tool="echo") == 5


async def test_readyz_reports_each_check(gateway: tuple[str, Gateway], http: httpx.AsyncClient) -> None:
    base, gw = gateway
    response = await http.get(f"{base}/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["audit"] == "ok"
    assert body["checks"]["state"] == "ok"
    assert gw.policy is not None and body["checks"]["policy"] == gw.policy.version
    assert (await http.get(f"{base}/healthz")).json() == {"status": "ok"}


@pytest.mark.pg
async def test_readiness_flips_when_the_audit_database_is_gone_and_back(
    tmp_path: Path, dev_key: DevKey, upstream_url: str, policy_dir: Path, http: httpx.AsyncClient
) -> None:
    pg = os.environ.get("BASTION_TEST_PG")
    if not pg:
        pytest.skip("BASTION_TEST_PG not set: readiness against a disappearing PostgreSQL skipped")
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    u = make_url(pg)
    dbname = "bastion_readyz_test"
    admin = await asyncpg.connect(host=u.host, port=u.port or 5432, user=u.username, database=u.database)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {dbname}")
        shutil.copy(dev_key.jwks_path, tmp_path / "dev-jwks.json")
        audit_url = u.set(database=dbname).render_as_string(hide_password=False)
        cfg = make_config(tmp_path, {"demo": upstream_url}, free_port(), policy_dir, audit={"url": audit_url})
        async with running_gateway(cfg) as (base, _):
            assert (await http.get(f"{base}/readyz")).status_code == 200
            await admin.execute(f"DROP DATABASE {dbname} WITH (FORCE)")
            gone = await http.get(f"{base}/readyz")
            assert gone.status_code == 503
            assert gone.json()["status"] == "not ready"
            assert gone.json()["checks"]["audit"].startswith("unavailable")
            await admin.execute(f"CREATE DATABASE {dbname}")
            back = await http.get(f"{base}/readyz")
            assert back.status_code == 200, back.text
            assert back.json()["checks"]["audit"] == "ok"
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        await admin.close()


@contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Everything Bastion's own loggers write at DEBUG, formatted as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    names = ("bastion", "gateway", "audit", "uvicorn")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).addHandler(handler)
        logging.getLogger(n).setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        for n in names:
            logging.getLogger(n).removeHandler(handler)
            logging.getLogger(n).setLevel(saved[n])


async def test_one_json_line_per_call_and_no_planted_secret(
    gateway: tuple[str, Gateway], token: Callable[..., str], http: httpx.AsyncClient
) -> None:
    base, _ = gateway
    secret_token = token(extra={"api_secret": PLANTED})
    with captured_logs() as stream:
        allowed = await call(http, base, secret_token, "echo", {"text": PLANTED, "password": PLANTED})
        denied = await call(http, base, secret_token, "transfer", {"amount": 5000, "to": PLANTED})
        refused = await http.post(
            f"{base}/mcp/demo",
            json=modern_call("echo", {"text": PLANTED}),
            headers=modern_headers(f"{PLANTED}.{PLANTED}.{PLANTED}", "tools/call", "echo"),
        )
        assert refused.status_code == 401
    text = stream.getvalue()
    assert PLANTED not in text
    assert secret_token not in text
    lines = [json.loads(line) for line in text.splitlines()]
    calls = [line for line in lines if line["logger"] == "bastion.calls"]
    assert [c["effect"] for c in calls] == ["allow", "deny", "deny"]
    first = calls[0]
    assert allowed["result"]["isError"] is False
    assert {"trace_id", "user", "upstream", "tool", "effect", "status", "latency_ms"} <= first.keys()
    assert (first["user"], first["upstream"], first["tool"], first["status"]) == (
        "dev",
        "demo",
        "echo",
        "completed",
    )
    assert calls[1]["audit_id"] == denied["result"]["structuredContent"]["audit_id"]
    assert calls[2]["stage"] == "identity" and calls[2]["user"] is None


def test_text_format_and_level_from_config(tmp_path: Path) -> None:
    cfg = config_mod.parse({"logging": {"level": "warning", "format": "text"}}, tmp_path)
    assert (cfg.logging.level, cfg.logging.format) == ("warning", "text")
    with pytest.raises(ConfigError, match=r"logging\.format"):
        config_mod.parse({"logging": {"format": "xml"}}, tmp_path)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        logs.setup(cfg.logging.level, cfg.logging.format, stream)
        logging.getLogger("bastion.calls").info("hidden at warning")
        logging.getLogger("bastion").warning("shown", extra={"upstream": "demo"})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    out = stream.getvalue()
    assert "hidden" not in out
    assert "WARNING bastion: shown upstream=demo" in out


def test_dashboard_uses_only_metrics_bastion_exports() -> None:
    from gateway import metrics

    dash = json.loads((REPO / "deploy" / "grafana" / "bastion.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    used = set(re.findall(r"\bbastion_[a-z_]+", exprs))
    exported = set(metrics.REGISTRY._names_to_collectors)
    assert len(used) >= 10
    assert used <= exported, used - exported


async def test_pii_findings_are_counted_by_entity_and_direction(
    tmp_path: Path, dev_key: DevKey, upstream_url: str, policy_dir: Path, http: httpx.AsyncClient
) -> None:
    shutil.copy(dev_key.jwks_path, tmp_path / "dev-jwks.json")
    redaction = {"entities": ["EMAIL_ADDRESS"], "default": {"arguments": "replace", "results": "replace"}}
    cfg = make_config(tmp_path, {"demo": upstream_url}, free_port(), policy_dir, redaction=redaction)
    async with running_gateway(cfg) as (base, _):
        tok = dev_key.mint("dev", audience=f"{base}/mcp/demo", groups=["developers"])
        before = await scrape(http, base)
        body = await call(http, base, tok, "echo", {"text": "write to jane.doe@example.com"})
        assert "jane.doe@example.com" not in json.dumps(body)
        after = await scrape(http, base)
    found = {"entity": "EMAIL_ADDRESS", "direction": "input"}
    assert (
        value(after, "bastion_pii_findings_total", **found)
        - value(before, "bastion_pii_findings_total", **found)
        == 1
    )


async def test_caller_chosen_names_mint_no_series(
    gateway: tuple[str, Gateway], token: Callable[..., str], http: httpx.AsyncClient
) -> None:
    """`/v1/tool-calls` names its upstream in the body: only configured upstreams become label
    values, and refused methods or resource URIs are labelled by their action, not by name."""
    base, _ = gateway
    for i in range(5):
        body = {"upstream": f"nope-{i}-{'x' * 40}", "tool": f"t{i}", "arguments": {}}
        got = await http.post(
            f"{base}/v1/tool-calls", json=body, headers={"authorization": f"Bearer {token()}"}
        )
        assert got.status_code in (401, 404)  # refused either way, and recorded (a decision is counted)
    text = (await http.get(f"{base}/metrics")).text
    assert "nope-" not in text
    assert re.search(
        r'bastion_decisions_total\{effect="deny",tool="[^"]*",upstream="unknown"\}', text
    ) or re.search(r'bastion_decisions_total\{effect="deny",upstream="unknown",tool="[^"]*"\}', text)
