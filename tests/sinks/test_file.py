"""The file sink: appended and fsynced per batch, rotated by size, readable by its owner only."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from conftest import running_gateway

from gateway.app import Gateway
from gateway.identity.devkeys import DevKey

from .conftest import chain, eventually, make_calls, sink_config


def _delivered(gw: Gateway) -> int:
    assert gw.sinks is not None
    return int(gw.sinks.status()["archive"]["delivered"])


async def test_records_are_appended_in_order_and_rotated_by_size(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    out = tmp_path / "trail" / "audit.ocsf"
    out.parent.mkdir()
    sink = {"name": "archive", "type": "file", "path": str(out), "format": "ocsf", "max_bytes": 8192,
            "backups": 50, "batch_max": 3}  # fmt: skip
    cfg = sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url)
    async with running_gateway(cfg) as (base, gw):
        await make_calls(base, dev_key, 25)
        stored = await chain(cfg.audit.url, "sinks-test")
        await eventually(
            lambda: gw.sinks is not None and gw.sinks.status()["archive"]["delivered"] >= len(stored)
        )
    files = sorted(out.parent.iterdir(), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    assert len(files) > 2, "8 KiB files hold a few records each: the trail was rotated"
    events = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert [e["unmapped"]["seq"] for e in events] == [s for s, _ in stored]
    assert all(e["class_uid"] == 6003 for e in events)
    assert all(f.stat().st_size <= 8192 for f in files)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


async def test_rotation_keeps_only_the_configured_backups(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    out = tmp_path / "audit.jsonl"
    sink = {
        "name": "archive",
        "type": "file",
        "path": str(out),
        "max_bytes": 4096,
        "backups": 2,
        "batch_max": 1,
    }
    cfg = sink_config(tmp_path, data_dir, [sink], upstream_url=upstream_url)
    async with running_gateway(cfg) as (base, gw):
        await make_calls(base, dev_key, 30)
        stored = await chain(cfg.audit.url, "sinks-test")
        await eventually(
            lambda: gw.sinks is not None and gw.sinks.status()["archive"]["delivered"] >= len(stored)
        )
    kept = sorted(p.name for p in tmp_path.glob("audit.jsonl*"))
    assert kept == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    newest = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    assert newest and newest[-1] == stored[-1][0]
