"""Audit sinks over HTTP, through a real gateway: a webhook and a Splunk HEC receiver on loopback
that refuse, hang and answer too late; delivery in chain order, at least once, never in the way."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from conftest import running_gateway

from audit.chain import document_hash
from gateway.identity.devkeys import DevKey

from .conftest import chain, eventually, first_seen, http_receiver, make_calls, sink_config


def _sink(url: str, **kw: object) -> dict[str, object]:
    return {"name": "siem", "type": "http", "url": url, "format": "jsonl", "timeout_s": 2, **kw}


async def test_every_record_arrives_in_chain_order_and_verifies_at_the_receiver(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    async with http_receiver() as rx:
        cfg = sink_config(tmp_path, data_dir, [_sink(rx.url, batch_max=7)], upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, gw):
            codes = await make_calls(base, dev_key, 20)
            assert codes.count(403) == 4 and codes.count(200) == 16
            stored = await chain(cfg.audit.url, "sinks-test")
            assert gw.sinks is not None
            sinks = gw.sinks
            # The receiver has the last batch a moment before the cursor and the lag move.
            await eventually(lambda: sinks.status()["siem"]["delivered"] >= len(stored))
            status = sinks.status()["siem"]
        docs = rx.docs()
        # jsonl is the stored text byte for byte: the receiver can recompute every hash and link.
        assert rx.lines == [text for _, text in stored]
        assert [d["seq"] for d in docs] == list(range(1, len(stored) + 1))
        prev = None
        for d in docs:
            assert d["hash"] == document_hash(d) and d["prev_hash"] == prev
            prev = d["hash"]
        assert {d["decision"]["effect"] for d in docs} == {"allow", "deny"}
        assert all(len(b.split(" ")[1].split("-")) == 2 for b in rx.batches)
        assert (
            max(int(b.split(" ")[1].split("-")[1]) - int(b.split(" ")[1].split("-")[0]) for b in rx.batches)
            < 7
        )
        assert status["state"] == "up" and status["lag_records"] == 0 and status["delivered"] == len(stored)


async def test_a_failing_receiver_is_retried_and_a_late_ack_duplicates_but_never_loses_or_reorders(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    async with http_receiver(fail=3, late=2, late_s=3.0) as rx:
        cfg = sink_config(
            tmp_path, data_dir, [_sink(rx.url, batch_max=4, timeout_s=0.5, backoff_max_s=0.5)],
            upstream_url=upstream_url,
        )  # fmt: skip
        async with running_gateway(cfg) as (base, _):
            await make_calls(base, dev_key, 15)
            stored = await chain(cfg.audit.url, "sinks-test")
            want = [seq for seq, _ in stored]
            await eventually(lambda: set(want) <= {d["seq"] for d in rx.docs()}, timeout=30)
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{base}/metrics")).text
        seqs = [d["seq"] for d in rx.docs()]
        assert len(seqs) > len(want), "an ACK that came too late makes the batch arrive twice"
        assert first_seen(seqs) == want
        assert rx.fail == 0 and rx.late == 0
        failures = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith('bastion_audit_sink_failures_total{sink="siem"}')
        )
        assert failures >= 5  # three refusals and two timeouts


async def test_a_receiver_that_hangs_costs_the_calls_nothing_and_readyz_reports_it(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    async with http_receiver(hang=True) as rx:
        sink = _sink(rx.url, timeout_s=5, max_lag_records=5)
        cfg = sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, gw):
            await make_calls(base, dev_key, 2)
            await eventually(lambda: rx.in_flight > 0)  # the first batch is stuck at the receiver
            started = time.monotonic()
            codes = await make_calls(base, dev_key, 20)
            took = time.monotonic() - started
            assert codes.count(200) == 16
            # Twenty governed calls while a delivery hangs for 5 s: they do not wait for it.
            assert took < 4.0, f"calls took {took:.1f} s while the sink hung"
            await eventually(lambda: gw.sinks is not None and not gw.sinks.workers[0].status.up)
            async with httpx.AsyncClient() as http:
                ready = await http.get(f"{base}/readyz")
                metrics = (await http.get(f"{base}/metrics")).text
        assert ready.status_code == 200, ready.text
        sinks = ready.json()["sinks"]
        assert sinks["siem"]["state"] == "down" and "ReadTimeout" in sinks["siem"]["last_error"]
        assert sinks["siem"]["lag_records"] >= 22
        assert 'bastion_audit_sink_up{sink="siem"} 0.0' in metrics
        assert 'bastion_audit_sink_backlog{sink="siem"} 1.0' in metrics
        lag = [
            ln for ln in metrics.splitlines() if ln.startswith('bastion_audit_sink_lag_records{sink="siem"}')
        ]
        assert lag and float(lag[0].split()[-1]) >= 22


async def test_delivery_resumes_at_the_cursor_after_a_restart(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    async with http_receiver() as rx:
        cfg = sink_config(tmp_path, data_dir, [_sink(rx.url)], upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, _):
            await make_calls(base, dev_key, 5)
            await eventually(lambda: len(rx.lines) == 5)
        rx.fail = 1_000_000  # down while the next gateway takes calls ...
        async with running_gateway(cfg) as (base, _):
            await make_calls(base, dev_key, 5)
            await eventually(lambda: len(rx.headers) >= 2)
        rx.fail = 0  # ... and up again for the third, which delivers only what was left
        async with running_gateway(cfg) as (base, _):
            await eventually(lambda: len(rx.lines) >= 10)
    assert [d["seq"] for d in rx.docs()] == list(range(1, 11))


async def test_splunk_hec_events_carry_the_record_and_a_wrong_token_is_an_error_not_a_loss(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_HEC_TOKEN", "wrong-token")
    async with http_receiver(token="Splunk 6f1c-hec-token") as rx:
        sink = _sink(rx.url, format="splunk-hec", token_env="TEST_HEC_TOKEN", backoff_max_s=0.5)
        cfg = sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url)
        async with running_gateway(cfg) as (base, gw):
            await make_calls(base, dev_key, 3)
            assert gw.sinks is not None
            await eventually(
                lambda: gw.sinks is not None and gw.sinks.status()["siem"]["last_error"] is not None
            )
            error = gw.sinks.status()["siem"]["last_error"]
        assert "HTTP 403" in error and "wrong-token" not in error
        assert rx.lines == []
        monkeypatch.setenv("TEST_HEC_TOKEN", "6f1c-hec-token")
        async with running_gateway(cfg) as (base, _):
            await eventually(lambda: len(rx.lines) >= 3)
        stored = dict(await chain(cfg.audit.url, "sinks-test"))
    events = rx.docs()
    assert [e["event"]["seq"] for e in events] == [1, 2, 3]
    for e in events:
        assert e["sourcetype"] == "bastion:audit" and e["host"] == "sinks-test" and e["source"] == "bastion"
        assert e["event"] == json.loads(stored[e["event"]["seq"]])
        assert abs(e["time"] - time.time()) < 120
    assert rx.headers[-1]["authorization"] == "Splunk 6f1c-hec-token"


async def test_a_missing_token_variable_stops_start_up_naming_the_sink(
    tmp_path: Path, data_dir: Path, upstream_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.app import Gateway
    from gateway.errors import ConfigError

    monkeypatch.delenv("TEST_HEC_TOKEN", raising=False)
    sink = _sink("http://127.0.0.1:9/x", format="splunk-hec", token_env="TEST_HEC_TOKEN")
    gw = Gateway(sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url))
    with pytest.raises(ConfigError, match=r"audit\.sinks\.siem\.token_env: TEST_HEC_TOKEN is not set"):
        await gw.start()
    await gw.stop()
