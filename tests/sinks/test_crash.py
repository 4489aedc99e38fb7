"""kill -9 of a real Bastion process while a batch is at the receiver: after the restart the
receiver has every chained record at least once, in chain order, and `bastion audit sinks`
shows the lag before and none after."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from conftest import POLICIES, free_port, wait_healthy

from gateway.identity.devkeys import DEV_ISSUER, DevKey

from .conftest import chain, eventually, first_seen, http_receiver


async def _sinks_status(config: Path) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "audit", "sinks", "status", "--json", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return [json.loads(line) for line in out.decode().splitlines()]


async def test_kill_9_mid_batch_loses_nothing(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    audit_url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    config = tmp_path / "bastion.yaml"
    log = (tmp_path / "bastion.log").open("wb")
    token = dev_key.mint("crash-user", audience=base, groups=["developers"])
    async with http_receiver(delay_s=0.15) as rx:
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": {"host": "127.0.0.1", "port": port},
                    "identity": {
                        "issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data_dir / "dev-jwks.json")}]
                    },
                    "policy": {"dir": str(POLICIES)},
                    "upstreams": {"demo": {"url": upstream_url}},
                    "audit": {
                        "url": audit_url,
                        "instance": "sink-crash",
                        "sinks": [
                            {
                                "name": "siem",
                                "type": "http",
                                "url": rx.url,
                                "format": "jsonl",
                                "batch_max": 10,
                                "timeout_s": 5,
                                "backoff_max_s": 0.5,
                            }
                        ],
                    },
                    "state": {"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
                    "data_dir": str(tmp_path / "data"),
                }
            )
        )

        async def start() -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), stdout=log, stderr=log
            )

        ids = itertools.count()

        async def worker(http: httpx.AsyncClient) -> None:
            while True:
                n = next(ids)
                tool = (
                    ("transfer", {"amount": 5000, "to": "x"}) if n % 6 == 0 else ("echo", {"text": f"m{n}"})
                )
                body = {"upstream": "demo", "tool": tool[0], "arguments": tool[1]}
                try:
                    await http.post(f"{base}/v1/tool-calls", json=body)
                except httpx.TransportError:
                    return  # bastion is gone

        proc = await start()
        try:
            async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {token}"}) as http:
                await wait_healthy(http, base, proc)
                workers = [asyncio.create_task(worker(http)) for _ in range(6)]
                # Kill while a batch is at the receiver (read, not yet acknowledged), after a few landed.
                await eventually(lambda: len(rx.batches) >= 3 and rx.in_flight > 0, timeout=30)
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                await asyncio.gather(*workers)
            before = await _sinks_status(config)
            assert before[0]["sink"] == "siem" and before[0]["instance"] == "sink-crash"
            assert before[0]["lag_records"] > 0 and before[0]["delivered_seq"] > 0

            proc = await start()  # resumes at the cursor; the batch in flight at the kill comes again
            async with httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {token}"}) as http:
                await wait_healthy(http, base, proc)
                r = await http.post(
                    f"{base}/v1/tool-calls",
                    json={"upstream": "demo", "tool": "echo", "arguments": {"text": "after"}},
                )
                assert r.status_code == 200, r.text
                stored = [s for s, _ in await chain(audit_url, "sink-crash")]
                await eventually(lambda: set(stored) <= {d["seq"] for d in rx.docs()}, timeout=30)
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            log.close()
        seqs = [d["seq"] for d in rx.docs()]
        assert first_seen(seqs) == stored, "every record at least once, in chain order"
        assert len(seqs) > len(stored), "the batch at the receiver when killed came again"
        after = await _sinks_status(config)
        assert after[0]["lag_records"] == 0 and after[0]["delivered_seq"] == stored[-1]
        assert after[0]["holder"] is None  # released at the orderly stop
