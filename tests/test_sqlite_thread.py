"""The group-committing SQLite writer thread that audit batches and budget charges go through."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from audit.sqlite_thread import SQLiteThread


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SQLiteThread]:
    path = tmp_path / "t.db"
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    setup.commit()
    setup.close()
    writer = await asyncio.to_thread(SQLiteThread, str(path), synchronous="FULL", name="test-sqlite")
    yield writer
    await asyncio.to_thread(writer.close)


def _rows(writer: SQLiteThread) -> dict[str, int]:
    conn = sqlite3.connect(writer.path)
    try:
        return dict(conn.execute("SELECT k, v FROM t").fetchall())
    finally:
        conn.close()


async def test_concurrent_work_is_committed_and_answered(db: SQLiteThread) -> None:
    def insert(i: int) -> Callable[[sqlite3.Connection], int]:
        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute("INSERT INTO t VALUES (?, ?) RETURNING v", (f"k{i}", i)).fetchone()[0])

        return run

    values = await asyncio.gather(*(db.run(insert(i)) for i in range(200)))
    assert values == list(range(200))
    assert _rows(db) == {f"k{i}": i for i in range(200)}


async def test_one_failing_function_does_not_undo_the_rest_of_its_group(db: SQLiteThread) -> None:
    """Each function runs in its own savepoint: its changes go, the others' stay."""

    def good(k: str) -> Callable[[sqlite3.Connection], Any]:
        return lambda conn: conn.execute("INSERT INTO t VALUES (?, 1)", (k,))

    def bad(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES ('half', 1)")  # written, then rolled back with the savepoint
        raise ValueError("refused half way")

    results = await asyncio.gather(db.run(good("a")), db.run(bad), db.run(good("b")), return_exceptions=True)
    assert isinstance(results[1], ValueError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    assert _rows(db) == {"a": 1, "b": 1}


async def test_a_constraint_error_reaches_its_caller_only(db: SQLiteThread) -> None:
    await db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('x', 1)"))
    dup, fine = await asyncio.gather(
        db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('x', 2)")),
        db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('y', 2)")),
        return_exceptions=True,
    )
    assert isinstance(dup, sqlite3.IntegrityError)
    assert not isinstance(fine, BaseException)
    assert _rows(db) == {"x": 1, "y": 2}


async def test_a_closed_writer_refuses_work(db: SQLiteThread) -> None:
    await asyncio.to_thread(db.close)
    with pytest.raises(sqlite3.OperationalError, match="stopped"):
        await db.run(lambda conn: None)


def test_an_unusable_path_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        SQLiteThread(str(tmp_path / "no" / "such" / "dir" / "t.db"), synchronous="FULL", name="x")


async def test_run_racing_close_answers_every_caller(tmp_path: Path) -> None:
    """Work handed over while the writer closes is either done or refused, never left waiting."""
    for attempt in range(10):
        writer = await asyncio.to_thread(
            SQLiteThread, str(tmp_path / f"r{attempt}.db"), synchronous="NORMAL", name="test-sqlite"
        )
        calls = [asyncio.create_task(writer.run(lambda conn: 1)) for _ in range(5)]
        closing = asyncio.create_task(asyncio.to_thread(writer.close))
        for _ in range(100):
            calls.append(asyncio.create_task(writer.run(lambda conn: 1)))
            await asyncio.sleep(0)
        await closing
        _, waiting = await asyncio.wait(calls, timeout=5)
        for task in waiting:
            task.cancel()
        assert not waiting, f"{len(waiting)} caller(s) never answered"
        for task in calls:
            error = task.exception()
            assert isinstance(error, sqlite3.OperationalError) if error else task.result() == 1


async def _answers(
    db: SQLiteThread, first: Callable[[sqlite3.Connection], Any]
) -> list[BaseException | None]:
    """Run `first` and an insert of ('a', 1) in one group; what each caller got (None: a value)."""
    done, waiting = await asyncio.wait(
        [
            asyncio.create_task(db.run(first)),
            asyncio.create_task(db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('a', 1)"))),
        ],
        timeout=5,
    )
    for task in waiting:
        task.cancel()
    assert not waiting, "a caller was never answered"
    return [t.exception() for t in done]


async def test_a_function_raising_stopiteration_fails_only_its_caller(db: SQLiteThread) -> None:
    """An asyncio future refuses StopIteration; its caller and the rest of its group still get answers."""

    def first_row(conn: sqlite3.Connection) -> Any:
        return next(iter(conn.execute("SELECT v FROM t WHERE k = 'none'")))

    errors = await _answers(db, first_row)
    assert sum(isinstance(e, RuntimeError) for e in errors) == 1
    assert _rows(db) == {"a": 1}


async def test_work_cancelled_before_it_ran_is_not_run(db: SQLiteThread) -> None:
    """A caller that was cancelled while its work waited in the queue has nothing written."""
    started, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(5)

    holding = asyncio.create_task(db.run(hold))
    await asyncio.to_thread(started.wait, 5)
    late = asyncio.create_task(db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('late', 1)")))
    await asyncio.sleep(0.01)
    late.cancel()
    release.set()
    await holding
    await db.run(lambda conn: None)
    assert late.cancelled()
    assert _rows(db) == {}


async def test_an_error_that_ends_the_transaction_fails_the_group_with_its_cause(db: SQLiteThread) -> None:
    """Disk full ends SQLite's whole transaction: every caller of the group is told so, nothing of
    the group is committed, and the thread serves the next group."""
    pages = await db.run(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await db.run(lambda conn: conn.execute(f"PRAGMA max_page_count={pages + 2}"))
    results = await asyncio.gather(
        db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('a', 1)")),
        db.run(lambda conn: conn.execute("INSERT INTO t VALUES (?, 2)", ("x" * 500_000,))),
        db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('b', 3)")),
        return_exceptions=True,
    )
    assert all(isinstance(r, sqlite3.OperationalError) and "full" in str(r) for r in results), results
    assert _rows(db) == {}
    await db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('c', 4)"))
    assert _rows(db) == {"c": 4}


async def test_a_base_exception_in_a_function_answers_its_group_and_thread_goes_on(db: SQLiteThread) -> None:
    def interrupted(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES ('half', 1)")
        raise KeyboardInterrupt

    errors = await _answers(db, interrupted)
    assert all(isinstance(e, sqlite3.OperationalError) for e in errors)
    assert _rows(db) == {}
    await db.run(lambda conn: conn.execute("INSERT INTO t VALUES ('b', 2)"))
    assert _rows(db) == {"b": 2}
