"""One thread that owns one raw `sqlite3` connection and commits in groups.

Why not SQLAlchemy over aiosqlite on the hot path: every statement there is a round trip to
aiosqlite's thread (begin, execute, commit, the pool's reset), each waking the event loop, and
the two threads fight over the GIL. Here a caller hands over a function of the connection; the
thread runs every function queued meanwhile inside ONE transaction (a savepoint each, so one
failing function does not undo the others), commits once, and wakes the event loop once for the
whole group. sqlite3 releases the GIL while SQLite works, so the loop keeps serving meanwhile.

Only for SQLite files: an in-memory database is private to its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

_STOP = object()


def sqlite_file(engine: AsyncEngine) -> str | None:
    """The file behind an SQLite engine, or None (another database, or one in memory)."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        return None
    return str(path)


class SQLiteThread:
    """`await run(fn)` returns `fn(conn)`'s value once the transaction it ran in is committed.

    `fn` runs inside a savepoint: if it raises, its own changes are rolled back and the caller
    gets the exception, while the rest of the group still commits. If the COMMIT itself fails,
    every caller of the group gets `sqlite3.Error`. Work whose caller was cancelled before it
    ran is skipped; work handed over once `close()` began is refused; every caller is answered.
    """

    def __init__(self, path: str, *, synchronous: str, name: str, max_group: int = 1000) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        self.path = path
        self._synchronous = synchronous
        self._max_group = max_group
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:  # nothing is queued behind `_STOP`, where the thread would never see it
            if self._closed:
                raise sqlite3.OperationalError(f"{self.path}: the writer thread has stopped")
            self._queue.put((loop, fut, fn))
        return await fut

    def close(self) -> None:
        """Finish what is queued, then stop and close the connection."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._thread.join()

    def _main(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=10000")
        except BaseException as exc:  # handed to the constructor's caller
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                group = [self._queue.get()]
                while len(group) < self._max_group:
                    try:
                        group.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(item is _STOP for item in group)
                work = [item for item in group if item is not _STOP]
                if work:
                    self._commit(conn, work)
                if stop:
                    return
        finally:
            # Stopped, or the connection broke: whatever is still queued gets an answer.
            with self._lock:
                self._closed = True
                left = []
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        left.append(item)
            _answer(left, sqlite3.OperationalError(f"{self.path}: the writer thread has stopped"))
            conn.close()

    def _commit(self, conn: sqlite3.Connection, work: list[Any]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for _loop, fut, fn in work:
                if fut.cancelled():  # its caller is gone and was told it did not happen
                    outcomes.append((False, None))
                    continue
                conn.execute("SAVEPOINT w")
                try:
                    value = fn(conn)
                except Exception as exc:
                    if not conn.in_transaction:  # SQLite ended the whole transaction (disk full, say)
                        raise
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    outcomes.append((False, exc))
                else:
                    conn.execute("RELEASE w")
                    outcomes.append((True, value))
            conn.execute("COMMIT")
        except BaseException as exc:
            failure = exc
            if not isinstance(exc, sqlite3.Error):
                failure = sqlite3.OperationalError(
                    f"{self.path}: {exc!r}; nothing of the group was committed"
                )
                failure.__cause__ = exc
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except BaseException:
                _answer(work, failure)  # the connection is unusable: this thread stops
                raise
            outcomes = [(False, failure)] * len(work)
        _send(work, outcomes)


def _answer(work: list[Any], exc: BaseException) -> None:
    """Fail every caller of `work` with `exc`."""
    _send(work, [(False, exc)] * len(work))


def _send(work: list[Any], outcomes: list[tuple[bool, Any]]) -> None:
    """Hand each caller its outcome: one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for (loop, fut, _fn), (ok, value) in zip(work, outcomes, strict=True):
        by_loop.setdefault(loop, []).append((fut, ok, value))
    for loop, done in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop was closed while we worked
            loop.call_soon_threadsafe(_deliver, done)


def _deliver(done: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in done:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        elif isinstance(value, StopIteration):  # a future refuses it: the caller would wait forever
            err = RuntimeError(f"{value!r} raised in the writer thread")
            err.__cause__ = value
            fut.set_exception(err)
        else:
            fut.set_exception(value)
