"""Hot reload: watch the policy files and swap in a new set only when it loads cleanly.

The files are polled (size, mtime, inode of every file of the set, the schema and the entities
file) rather than watched through inotify, so edits over NFS and Kubernetes ConfigMap updates
(an atomic symlink swap) are seen too. A change is loaded off the event loop with exactly the
checks of start-up; a set that fails them is refused and the running one keeps deciding. The
refusal is logged, counted and shown on `/readyz` until a later change loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import metrics
from gateway.config import PolicyConfig
from gateway.errors import ConfigError
from gateway.policy.engine import PolicyEngine, policy_files

__all__ = ["PolicyWatcher", "ReloadStatus"]

log = logging.getLogger("bastion.policy")

SETTLE_S = 0.1
"""After a change is seen, wait this long for the files to stop changing before loading."""
_SETTLE_ROUNDS = 20

_Snapshot = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    """What `/readyz` shows about hot reload."""

    active_version: str | None
    reloads: int
    failures: int
    error: str | None
    """Why the files on disk were refused; None when the active set matches them."""
    error_at: float | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "refused" if self.error else "ok",
            "active_version": self.active_version,
            "reloads": self.reloads,
            "failures": self.failures,
        }
        if self.error is not None:
            out["error"] = self.error
            out["refused_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.error_at or 0))
        return out


def _stat(path: Path) -> tuple[str, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), -1, -1, -1)
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)


def snapshot(cfg: PolicyConfig) -> _Snapshot:
    """What the set's files look like now; any difference means "reload"."""
    paths = policy_files(cfg.dir, cfg.exclude) if cfg.dir.is_dir() else []
    extra = [cfg.schema_path, cfg.entities or cfg.dir / "entities.json"]
    return tuple(_stat(p) for p in [*paths, *extra])


class PolicyWatcher:
    """Polls `cfg`'s files every `cfg.watch_interval_s` and installs each set that loads.

    `load` reads the set as start-up did (with the upstream tool schemas and prompt arguments
    learned then, which type `context.args`); `install` receives each new engine and must swap it
    in atomically. With `shadow`, the set watched is the shadow set (docs/policy.md, "Shadow
    mode"): the same checks, its own metrics (`bastion_policy_shadow_reload*`) and log wording.
    """

    def __init__(
        self,
        cfg: PolicyConfig,
        load: Callable[[], PolicyEngine],
        install: Callable[[PolicyEngine], None],
        active_version: Callable[[], str | None],
        shadow: bool = False,
    ) -> None:
        self._cfg = cfg
        self._shadow = shadow
        self._what = "shadow policy" if shadow else "policy"
        self._reloads, self._failures, self._refused = (
            (metrics.SHADOW_RELOADS, metrics.SHADOW_RELOAD_FAILURES, metrics.SHADOW_RELOAD_REFUSED)
            if shadow
            else (metrics.POLICY_RELOADS, metrics.POLICY_RELOAD_FAILURES, metrics.POLICY_RELOAD_REFUSED)
        )
        self._load = load
        self._install = install
        self._active_version = active_version
        self._seen: _Snapshot = ()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.reloads = 0
        self.failures = 0
        self.error: str | None = None
        self.error_at: float | None = None

    def start(self) -> None:
        """Begin watching from the files as they are now (the set just loaded at start-up)."""
        self._seen = snapshot(self._cfg)
        name = "bastion-shadow-watch" if self._shadow else "bastion-policy-watch"
        self._task = asyncio.create_task(self._run(), name=name)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def status(self) -> ReloadStatus:
        return ReloadStatus(self._active_version(), self.reloads, self.failures, self.error, self.error_at)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.watch_interval_s)
            try:
                await self.check()
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("%s reload crashed; the active set keeps serving", self._what)

    async def check(self) -> bool:
        """Reload if the files changed since the last look; True when a new set was installed."""
        async with self._lock:
            current = await asyncio.to_thread(snapshot, self._cfg)
            if current == self._seen:
                return False
            for _ in range(_SETTLE_ROUNDS):
                await asyncio.sleep(SETTLE_S)
                settled = await asyncio.to_thread(snapshot, self._cfg)
                if settled == current:
                    break
                current = settled
            self._seen = current
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            engine = await asyncio.to_thread(self._load)
        except ConfigError as exc:
            self.failures += 1
            self.error = exc.message
            self.error_at = time.time()
            self._failures.inc()
            self._refused.set(1)
            log.error(
                "%s reload refused; set %s keeps serving:\n%s",
                self._what,
                self._active_version(),
                exc.message,
            )
            return False
        self.error = self.error_at = None
        self._refused.set(0)
        for warning in engine.warnings:
            log.warning("%s: %s", self._what, warning)
        old = self._active_version()
        if engine.version == old:
            return False
        self._install(engine)
        self.reloads += 1
        self._reloads.inc()
        log.info("%s set %s replaces %s (%d policies)", self._what, engine.version, old, len(engine.policies))
        return True
