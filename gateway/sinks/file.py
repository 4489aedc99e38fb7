"""A local file, one record per line, rotated by size: each batch is appended and fsynced before
its cursor moves, so a crash at any point leaves every record in the file at least once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gateway.config import FileSinkConfig
from gateway.errors import SinkError
from gateway.sinks.events import Event


class FileTarget:
    def __init__(self, cfg: FileSinkConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)

    def describe(self) -> str:
        return str(self.path)

    async def send(self, events: list[Event]) -> None:
        data = "".join(e.line + "\n" for e in events).encode()
        try:
            await asyncio.to_thread(self._append, data)
        except OSError as exc:
            raise SinkError(f"{self.path}: {type(exc).__name__}: {exc.strerror or exc}"[:300]) from exc

    def _append(self, data: bytes) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.cfg.max_bytes:
            self._rotate()
        # 0600: the trail names users and tools; whoever may read it is the operator's choice.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        keep = self.cfg.backups
        if keep == 0:
            self.path.unlink(missing_ok=True)
        else:
            self.path.with_name(f"{self.path.name}.{keep}").unlink(missing_ok=True)
            for n in range(keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames survive a power loss before the next append
        finally:
            os.close(dir_fd)

    async def aclose(self) -> None:
        return None
