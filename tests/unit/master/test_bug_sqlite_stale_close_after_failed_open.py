"""Regression: a failed ``SqliteStore.open()`` retired its thread by queueing a close job that
closed whatever handles the store held *when the job ran*. A retried open() on a new thread
could install its lock descriptor first, and the old thread's late job then closed it: the
retry failed with "Bad file descriptor" (the first test fails so on the old code). By the same
mechanism a successful reopen could lose its lock, letting a second master open the database;
the second test guards that (it did not catch the old code in our runs). Seen as a flaky
``test_not_a_master_store_is_refused``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blockyard.errors import StoreFormatError, StoreLockedError
from blockyard.master.store_sqlite import SqliteStore

ROUNDS = 60


def test_retried_open_after_a_format_error_fails_the_same_way(tmp_path: Path) -> None:
    db = tmp_path / "master.db"
    db.write_bytes(b"not a database " * 200)

    async def main() -> None:
        store = SqliteStore(db)
        for _ in range(ROUNDS):
            with pytest.raises(StoreFormatError):
                await store.open()

    asyncio.run(main())


def test_reopen_after_a_refused_open_keeps_its_lock(tmp_path: Path) -> None:
    db = tmp_path / "master.db"

    async def main() -> None:
        for i in range(ROUNDS):
            holder = SqliteStore(db)
            await holder.open()
            store = SqliteStore(db)
            with pytest.raises(StoreLockedError):
                await store.open()
            await holder.close()
            await store.open()  # a new thread, while the refused open's thread retires
            await asyncio.sleep(0.005)  # let the old thread's last job run
            third = SqliteStore(db)
            with pytest.raises(StoreLockedError):
                await third.open()
            await store.campaign("m", "a:1")
            await store.put("volumes", f"v{i}", b"x", expect_version=0)
            await store.close()

    asyncio.run(main())
