"""Start the upstream and Bastion as separate processes, each on its own loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway import config as config_mod
from gateway.errors import ConfigError
from gateway.identity.devkeys import DEV_ISSUER, ensure_dev_key

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = "bench"
POLICY = """@id("bench-may-echo")
@reason("the benchmark may call echo")
permit (principal in Group::"bench", action in [Action::"call_tool", Action::"list_tools"], resource);
"""
BUDGETS = [
    {
        "name": "bench-per-user",
        "match": {"tools": [f"{UPSTREAM}/echo"]},
        "per": ["user"],
        "limit": 1_000_000_000,
        "window": "1d",
    }
]
REDACTION = {
    "entities": [
        "EMAIL_ADDRESS",
        "PHONE_NUMBER",
        "CREDIT_CARD",
        "US_SSN",
        "IBAN_CODE",
        "IP_ADDRESS",
        "SECRET",
    ],
    "default": {"arguments": "replace", "results": "none"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def supported(section: str, value: Any, base: dict[str, Any], where: Path) -> str | None:
    """None if this build accepts the config `section`, else the reason it refuses it."""
    try:
        config_mod.parse({**base, section: value}, where)
    except ConfigError as err:
        return err.message.replace("\n", " ")
    return None


def gateway_config(
    work: Path, upstream_url: str, port: int, upstreams: dict[str, dict[str, Any]] | None = None
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """Bastion's config for the benchmark; also says which optional sections this build supports.

    `upstreams` replaces the one upstream `bench` at `upstream_url` (name -> its config)."""
    key = ensure_dev_key(work)
    policies = work / "policies"
    policies.mkdir(exist_ok=True)
    shutil.copy(REPO / "policies" / "schema.cedarschema", policies / "schema.cedarschema")
    (policies / "bench.cedar").write_text(POLICY)
    base: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(key.jwks_path)}]},
        "policy": {"dir": str(policies)},
        "upstreams": upstreams or {UPSTREAM: {"url": upstream_url}},
        "audit": {"url": f"sqlite+aiosqlite:///{work / 'audit.db'}"},
        "state": {"url": f"sqlite+aiosqlite:///{work / 'state.db'}"},
        "data_dir": str(work),
    }
    extras = {
        "budgets": supported("budgets", BUDGETS, base, work),
        "redaction": supported("redaction", REDACTION, base, work),
        "intent": supported("audit", {**base["audit"], "durability": "intent"}, base, work),
    }
    return base, extras


class Proc:
    """A child process whose output goes to a log file (a full pipe would stall it)."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._out = log.open("wb")
        self.popen = subprocess.Popen(
            list(argv), stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 is index 0), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (the workers of `listen.workers: N`), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """User + system CPU time a process (all its threads) has used so far; 0 where /proc is missing.
    With `tree`, its live children's (and theirs) too: a supervisor and its workers."""
    fields = _stat(pid)
    own = 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + (sum(cpu_seconds(child, True) for child in children(pid)) if tree else 0.0)


def rss_bytes(pid: int, tree: bool = False) -> int:
    """Resident set size of a process (with `tree`: summed over it and its live descendants, which
    counts pages they share once per process); 0 where /proc is missing."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        return 0
    return total + (sum(rss_bytes(child, True) for child in children(pid)) if tree else 0)


def wait_ready(
    proc: Proc, url: str, ok: tuple[int, ...], timeout: float = 30.0, method: str = "GET", **kw: Any
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            if httpx.request(method, url, timeout=1, **kw).status_code in ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout:.0f} s:\n{proc.tail()}")


@contextlib.contextmanager
def upstream(work: Path, kind: str = "json", ready: bool = True) -> Iterator[tuple[Proc, str]]:
    """The benchmark's upstream (`bench.upstream`, `kind` json or sdk), in its own process. With
    `ready=False` it yields as soon as the process is started: call `wait_mcp` before using it."""
    port = free_port()
    name = "upstream" if kind == "json" else f"upstream-{kind}"
    argv = [sys.executable, "-m", "bench.upstream", str(port), kind]
    proc = Proc(name, argv, work / f"{name}.log")
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        if ready:
            wait_mcp(proc, url)
        yield proc, url
    finally:
        proc.stop()


def wait_mcp(proc: Proc, url: str, timeout: float = 30.0) -> None:
    """Until the MCP endpoint `url` answers a 2026-07-28 `server/discover`."""
    content, headers = _discover_probe()
    wait_ready(proc, url, (200,), timeout, method="POST", content=content, headers=headers)


def _discover_probe() -> tuple[str, dict[str, str]]:
    discover = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "server/discover",
        "params": {
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
            }
        },
    }
    headers = {
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "server/discover",
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
    }
    return json.dumps(discover), headers


@contextlib.contextmanager
def llm_provider(work: Path, ready: bool = True) -> Iterator[tuple[Proc, str]]:
    """The LLM benchmark's model provider (`bench.llm_provider`), in its own process; yields its base
    URL (`http://127.0.0.1:PORT`, the APIs under `/v1/`). With `ready=False` it yields as soon as the
    process is started: call `wait_llm_provider` before using it."""
    port = free_port()
    proc = Proc("provider", [sys.executable, "-m", "bench.llm_provider", str(port)], work / "provider.log")
    try:
        url = f"http://127.0.0.1:{port}"
        if ready:
            wait_llm_provider(proc, url)
        yield proc, url
    finally:
        proc.stop()


def wait_llm_provider(proc: Proc, url: str) -> None:
    probe = {"model": "ready", "max_tokens": 1, "messages": []}
    wait_ready(proc, f"{url}/v1/messages", (200,), method="POST", json=probe)


@contextlib.contextmanager
def passthrough(
    work: Path, upstream_url: str, name: str = "passthrough", ready: bool = True
) -> Iterator[tuple[Proc, str]]:
    """The bare forwarding proxy of scenario (p) (`bench.passthrough`), in its own process (with
    `ready=False`: call `wait_mcp` before using it)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.passthrough", str(port), upstream_url]
    proc = Proc(name, argv, work / f"{name}.log")
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        if ready:
            wait_mcp(proc, url)
        yield proc, url
    finally:
        proc.stop()


@contextlib.contextmanager
def bastion(work: Path, cfg: dict[str, Any], name: str, ready: bool = True) -> Iterator[tuple[Proc, str]]:
    """Bastion serving `cfg` in its own process (`gateway.cli serve`, as an operator runs it). With
    `ready=False` it yields as soon as the process is started: call `wait_bastion` before using it
    (so several processes can start at once)."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)]
    proc = Proc(name, argv, work / f"{name}.log", {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{cfg['listen']['port']}"
        if ready:
            wait_bastion(proc, base)
        yield proc, f"{base}/mcp/{UPSTREAM}"
    finally:
        proc.stop()


def wait_bastion(proc: Proc, base: str, timeout: float = 30.0) -> None:
    """Until Bastion at `base` (`http://HOST:PORT`) is ready."""
    wait_ready(proc, f"{base}/readyz", (200,), timeout)


@contextlib.contextmanager
def profiled(pid: int, out: Path, rate: int) -> Iterator[None]:
    """Sample `pid` with `py-spy record` (collapsed stacks, idle frames dropped) while the block runs."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    argv = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        str(rate),
        "--nonblocking",
        "--threads",
        "-o",
        str(out),
    ]
    proc = Proc("py-spy", argv, out.with_suffix(".log"))
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.popen.send_signal(signal.SIGINT)
        try:
            proc.popen.wait(30)
        finally:
            proc.stop()
