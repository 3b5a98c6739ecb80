"""The sqlite store's own guarantees (the shared ones are in the conformance suite): a second
master on the same database is refused, in this process and in another; files that are not a
master store are refused; a replaced lock file fences the writer; the database is in WAL mode
with synchronous=FULL; sqlite runs off the event loop; a timed-out call is reported as such."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blockyard.errors import (
    StoreFencedError,
    StoreFormatError,
    StoreLockedError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from blockyard.master.store_sqlite import SqliteStore

T = TypeVar("T")
TEST_TIMEOUT_S = 60.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            return await coro

    return asyncio.run(bounded())


def test_second_master_on_the_same_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "master.db"

    async def main() -> None:
        first = SqliteStore(db)
        await first.open()
        await first.campaign("m-one", "10.0.0.1:9400")
        second = SqliteStore(db)
        with pytest.raises(StoreLockedError) as info:
            await second.open()
        message = str(info.value)
        assert "m-one" in message and "10.0.0.1:9400" in message and "etcd://" in message
        await second.close()  # nothing held: close is a no-op
        await first.close()
        # Once the first is gone the second starts, and a failed open could be retried.
        await second.open()
        await second.campaign("m-two", "b:1")
        assert await second.put("volumes", "v", b"x", expect_version=0) > 0
        await second.close()

    run(main())


def test_second_master_in_another_process_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "master.db"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from blockyard.errors import StoreLockedError\n"
        "from blockyard.master.store_sqlite import SqliteStore\n"
        "async def main():\n"
        "    try:\n"
        "        await SqliteStore(Path(sys.argv[1])).open()\n"
        "    except StoreLockedError as exc:\n"
        "        print(exc)\n"
        "        return 7\n"
        "    return 0\n"
        "sys.exit(asyncio.run(main()))\n"
    )

    async def main() -> subprocess.CompletedProcess[str]:
        store = SqliteStore(db)
        await store.open()
        await store.campaign("holder", "h:1")
        try:
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", script, str(db)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        finally:
            await store.close()

    done = run(main())
    assert done.returncode == 7, done.stderr
    assert "holder" in done.stdout


@pytest.mark.parametrize("content", ["text", "other-sqlite", "newer"])
def test_not_a_master_store_is_refused(tmp_path: Path, content: str) -> None:
    db = tmp_path / "master.db"
    if content == "text":
        db.write_bytes(b"this is not a database at all, but it is long enough " * 100)
    else:
        conn = sqlite3.connect(db)
        if content == "other-sqlite":
            conn.execute("CREATE TABLE t (x)")
        else:
            conn.execute("PRAGMA application_id=1112100179")  # ours, "BYMS"
            conn.execute("PRAGMA user_version=99")
            conn.execute("CREATE TABLE t (x)")
        conn.commit()
        conn.close()

    async def main() -> None:
        store = SqliteStore(db)
        with pytest.raises(StoreFormatError):
            await store.open()
        # The lock was released: a second try fails the same way, not as "locked".
        with pytest.raises(StoreFormatError):
            await store.open()

    run(main())


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(StoreUnavailableError, match="does not exist"):
            await SqliteStore(tmp_path / "nope" / "master.db").open()

    run(main())


def test_wal_mode_and_full_sync(tmp_path: Path) -> None:
    db = tmp_path / "master.db"

    async def main() -> tuple[str, int]:
        store = SqliteStore(db)
        await store.open()
        await store.campaign("m", "a:1")
        await store.put("volumes", "v", b"x", expect_version=0)
        conn = store._conn
        assert conn is not None
        result = await store._call(
            "pragmas",
            lambda: (
                conn.execute("PRAGMA journal_mode").fetchone()[0],
                conn.execute("PRAGMA synchronous").fetchone()[0],
            ),
        )
        await store.close()
        return result

    mode, sync = run(main())
    assert (mode, sync) == ("wal", 2)  # 2 = FULL


def test_replaced_lock_file_fences_the_writer(tmp_path: Path) -> None:
    db = tmp_path / "master.db"

    async def main() -> None:
        store = SqliteStore(db)
        await store.open()
        await store.campaign("m", "a:1")
        await store.put("volumes", "v", b"x", expect_version=0)
        store.lock_path.unlink()  # an operator "cleans up"; another master could lock anew
        with pytest.raises(StoreFencedError):
            await store.put("volumes", "v", b"y", expect_version=None)
        assert store.leadership_lost.is_set()
        assert not store.is_leader
        await store.close()

    run(main())


def test_sqlite_runs_on_its_own_thread_and_a_slow_call_times_out(tmp_path: Path) -> None:
    db = tmp_path / "master.db"

    async def main() -> None:
        store = SqliteStore(db, op_timeout_s=0.5)
        await store.open()
        await store.campaign("m", "a:1")
        loop_thread = threading.get_ident()
        seen: list[int] = []
        release = threading.Event()

        def slow() -> None:
            seen.append(threading.get_ident())
            release.wait(10)

        started = time.monotonic()
        with pytest.raises(StoreTimeoutError, match="outcome is unknown"):
            await store._call("slow", slow)
        # The loop was free while the store's thread was busy.
        assert time.monotonic() - started < 5
        assert seen and seen[0] != loop_thread
        release.set()
        # The store works again once its thread is free.
        assert await store.put("volumes", "v", b"x", expect_version=0) > 0
        await store.close()

    run(main())
