"""Several gateway processes on one port: `listen.workers: N`.

Bastion serves from one event loop, which uses one core. With `workers: N`, `bastion serve`
becomes a supervisor that starts N copies of itself (`bastion serve --worker I`), each binding the
port with `SO_REUSEPORT` so that the kernel spreads new connections over them. Nothing a call
needs lives in one worker only: budgets, approvals, call_ids, pins and taint are in the state
database; sessions are signed; each worker writes its own audit hash chain (instance
`<audit.instance>-w<I>`, all in one store, each verifiable on its own).

The supervisor refuses a port that another process already holds (status 2), prepares the
databases once (schema migrations), then starts the workers. It restarts a worker that dies
(after 1 s, doubling up to 30 s while it keeps dying soon after each start); a worker that cannot
start before the port first answered (a bad policy file, say) would fail again, so the
supervisor stops with status 2 instead. It forwards SIGTERM/SIGINT to every worker and waits for
them to flush their audit records and sign their final checkpoints. `/metrics` on any worker
reports all of them: the supervisor gives them a shared, fresh `PROMETHEUS_MULTIPROC_DIR` unless
one is set.

Workers share the state and audit databases. On SQLite they take turns for its write lock, which
costs more than it gains (measured in docs/benchmarks.md); use PostgreSQL with several workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from gateway.config import Config
from gateway.errors import ConfigError

log = logging.getLogger("bastion.workers")

RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
STABLE_S = 60.0
"""A worker that ran this long before it died is restarted after `RESTART_MIN_S` again."""
STOP_TIMEOUT_S = 30.0
START_FAILED = 2
"""The exit status of `bastion serve` refused by its config (or what it names: policies, keys,
databases). Starting such a worker again would fail again, so the supervisor stops instead."""


def instance_of(cfg: Config, worker: int) -> str:
    """The audit instance (hash chain) of one worker."""
    return f"{cfg.audit.instance or socket.gethostname()}-w{worker}"


def supervise(cfg: Config, config_path: Path) -> int:
    """Run `cfg.listen.workers` workers until SIGTERM/SIGINT; 0 when all stopped cleanly.

    Raises `ConfigError` when the port is held by another process or the databases cannot be
    prepared (before any worker starts)."""
    n = cfg.listen.workers
    _port_free(cfg.listen.host, cfg.listen.port)
    if cfg.ops.listen is not None:  # every worker binds it too, with SO_REUSEPORT
        _port_free(cfg.ops.listen.host, cfg.ops.listen.port, "ops.listen.port")
    asyncio.run(_prepare(cfg))
    env = dict(os.environ)
    own_metrics_dir = None
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        own_metrics_dir = tempfile.mkdtemp(prefix="bastion-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
    metrics_dir = env["PROMETHEUS_MULTIPROC_DIR"]
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def start(i: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config_path)]
        return subprocess.Popen([*argv, "--worker", str(i)], env=env)  # noqa: S603 (our own command)

    procs = {i: start(i) for i in range(n)}
    started = dict.fromkeys(procs, time.monotonic())
    delay = dict.fromkeys(procs, RESTART_MIN_S)
    due: dict[int, float] = {}
    up = False
    """Whether the port has answered once: a worker refused before that is refused by its
    config; after it, a refusal may pass (a database restarting), so it is started again."""
    log.info("supervising %d workers on %s:%d", n, cfg.listen.host, cfg.listen.port)
    try:
        while not stopping:
            time.sleep(0.2)
            now = time.monotonic()
            up = up or _listening(cfg.listen.host, cfg.listen.port)
            for i, proc in list(procs.items()):
                code = proc.poll()
                if code is None or i in due:
                    continue
                _mark_dead(proc.pid, metrics_dir)
                if code == START_FAILED and not up:
                    log.error("worker %d could not start (its error is above): stopping", i)
                    _stop_all(procs, metrics_dir)
                    return START_FAILED
                if now - started[i] >= STABLE_S:
                    delay[i] = RESTART_MIN_S  # it had been running well: not a crash loop
                why = f"worker {i} (pid {proc.pid}) exited with {code}"
                log.error("%s; restarting in %.0f s", why, delay[i])
                due[i] = now + delay[i]
                delay[i] = min(delay[i] * 2, RESTART_MAX_S)
            for i, when in list(due.items()):
                if now >= when and not stopping:
                    del due[i]
                    procs[i], started[i] = start(i), now
        return _stop_all(procs, metrics_dir)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)


async def _prepare(cfg: Config) -> None:
    """Create or migrate the audit and state schemas once, before the workers open them all at
    the same moment (concurrent DDL on one database would fail some of them)."""
    from audit.store import AuditStore, AuditStoreError
    from gateway.state.db import open_state

    try:
        store = await AuditStore.open(cfg.audit.url)
    except AuditStoreError as exc:
        raise ConfigError(f"audit.url: {exc}") from exc
    await store.close()
    engine = await open_state(cfg.state.url)
    await engine.dispose()


def _port_free(host: str, port: int, key: str = "listen.port") -> None:
    """Refuse a port another process holds: every worker would fail to bind it and be restarted
    for good, while the port answers for someone else (`SO_REUSEPORT` would even let another
    process of this user take a share of the connections)."""
    taken = f"{key}: {host}:{port} is already in use by another process"
    if _listening(host, port):
        raise ConfigError(taken)
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"{taken} ({exc.strerror or exc})") from exc
    finally:
        probe.close()


def _listening(host: str, port: int) -> bool:
    """Whether some worker accepts connections on the port (workers bind only once started)."""
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 (connects, binds nothing)
    target = wildcard.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop_all(procs: dict[int, subprocess.Popen[bytes]], metrics_dir: str) -> int:
    """SIGTERM every worker and wait for it (SIGKILL after `STOP_TIMEOUT_S`); 0 if all exited 0."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    worst = 0
    for i, proc in procs.items():
        try:
            code = proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop within %.0f s: killed", i, STOP_TIMEOUT_S)
            proc.kill()
            code = proc.wait()
        _mark_dead(proc.pid, metrics_dir)
        worst = worst or (0 if code in (0, -signal.SIGTERM) else 1)
    return worst


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a stopped worker's live gauges from what `/metrics` reports."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
