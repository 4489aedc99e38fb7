"""The group-committing SQLite writer thread that audit batches and budget charges go through."""

from __future__ import annotations

import asyncio
import sqlite3
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
