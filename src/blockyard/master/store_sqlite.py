"""``sqlite://`` — the embedded store of a single master.

One database file in WAL mode with ``synchronous=FULL`` (a put is on disk, WAL and all, when
it returns). Beside it, ``<file>.lock`` is held with an exclusive ``flock`` from :meth:`open`
to :meth:`close`, so a second master started on the same database refuses to start
(:class:`StoreLockedError` naming the holder, whose master id, address and pid the lock file
records). ``flock`` rather than ``fcntl(F_SETLK)``: POSIX record locks belong to the process
and vanish when *any* descriptor of the file closes, and two stores in one process would not
exclude each other; a ``flock`` belongs to the open file. Leadership is the lock: a campaign
wins at once and bumps a term counter (the :class:`LeaderInfo` token). Every write first checks
that the lock file is still the one locked (someone removing it lets another master lock a new
file); if it is not, leadership is lost and the write is refused.

Versions are the store's revision, a counter in the ``meta`` table bumped by every write, as
etcd's revision is: they grow per key across deletes and re-creates, like the etcd store's.

All sqlite calls run on one dedicated thread that owns the connection (sqlite calls block on
the disk and must not stall the event loop); at most ``max_pending`` calls wait for it, and
each is bounded by ``op_timeout_s``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from blockyard.errors import (
    NotLeaderError,
    StoreClosedError,
    StoreConflictError,
    StoreFencedError,
    StoreFormatError,
    StoreLockedError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from blockyard.master.store import (
    DEFAULT_OP_TIMEOUT_S,
    LeaderInfo,
    Snapshot,
    StoredRecord,
    check_expect_version,
    check_value,
    record_key,
)

T = TypeVar("T")

#: ``PRAGMA application_id`` of a blockyard master database (SQLite file format §1.3.12:
#: a 32-bit id at header offset 68 naming the application that owns the file): "BYMS".
APPLICATION_ID: Final = 0x42594D53
#: ``PRAGMA user_version``: the schema version this code writes and reads.
SCHEMA_VERSION: Final = 1
#: How long sqlite itself waits for a lock held by a reader in another process (the CLI may
#: read the database while the master runs).
BUSY_TIMEOUT_MS: Final = 5000
#: Calls that may wait for the store's thread at once.
DEFAULT_MAX_PENDING: Final = 64
#: Bytes of the lock file's holder description read back for an error message.
LOCK_INFO_MAX_BYTES: Final = 4096

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS records ("
    " kind TEXT NOT NULL, id TEXT NOT NULL, value BLOB NOT NULL, version INTEGER NOT NULL,"
    " PRIMARY KEY (kind, id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('term', 0)",
)


class SqliteStore:
    """A :class:`~blockyard.master.store.MasterStore` in one SQLite file (one master)."""

    def __init__(
        self,
        path: Path,
        *,
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self._op_timeout_s = op_timeout_s
        self._max_pending = max_pending
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        # Bumped when a thread is retired (see _shutdown_thread).
        self._gen = 0
        # Touched only on the store's thread.
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # Touched only on the event loop.
        self._leader: LeaderInfo | None = None
        self._lost = asyncio.Event()
        self._lost.set()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="master-sqlite"
        )
        self._slots = asyncio.Semaphore(self._max_pending)
        try:
            await self._call("open", self._open_sync, self._gen)
        except BaseException:
            await self._shutdown_thread()
            raise

    async def close(self) -> None:
        if self._executor is None:
            return
        self._lose_leadership()
        try:
            await self._call("close", self._close_sync)
        finally:
            await self._shutdown_thread()

    async def _shutdown_thread(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # A call that timed out may still run on the old thread. Its handles are taken from it
        # here and closed by a last job after it; the generation bump makes an open that is
        # still running there close what it opens instead of installing it, so nothing of the
        # old thread touches what a later open() installs. Not waited for: it is bounded by
        # sqlite's own busy timeout.
        self._gen += 1
        conn, self._conn = self._conn, None
        fd, self._lock_fd = self._lock_fd, None
        executor.submit(_close_handles, conn, fd)
        executor.shutdown(wait=False)

    # --- leadership --------------------------------------------------------------------------

    async def campaign(
        self, master_id: str, address: str, *, timeout_s: float | None = None
    ) -> None:
        del timeout_s  # the lock taken by open() is the leadership: nothing to wait for
        term = await self._call("campaign", self._campaign_sync, master_id, address)
        self._leader = LeaderInfo(master_id=master_id, address=address, token=term)
        if self._lost.is_set():  # a new leadership; while leading, waiters keep theirs
            self._lost = asyncio.Event()

    def leader(self) -> LeaderInfo | None:
        return self._leader

    @property
    def is_leader(self) -> bool:
        return self._leader is not None and not self._lost.is_set()

    @property
    def leadership_lost(self) -> asyncio.Event:
        return self._lost

    def _lose_leadership(self) -> None:
        self._lost.set()

    # --- records -----------------------------------------------------------------------------

    async def load(self) -> Snapshot:
        return await self._call("load", self._load_sync)

    async def put(self, kind: str, id: str, value: bytes, *, expect_version: int | None) -> int:
        key = record_key(kind, id)
        check_value(key, value)
        check_expect_version(key, expect_version)
        self._check_leader(key)
        try:
            return await self._call(
                f"put {key}", self._put_sync, kind, id, bytes(value), expect_version
            )
        except StoreFencedError:
            self._lose_leadership()
            raise

    async def delete(self, kind: str, id: str, *, expect_version: int | None) -> None:
        key = record_key(kind, id)
        check_expect_version(key, expect_version)
        self._check_leader(key)
        try:
            await self._call(f"delete {key}", self._delete_sync, kind, id, expect_version)
        except StoreFencedError:
            self._lose_leadership()
            raise

    def _check_leader(self, key: str) -> None:
        if self._executor is None:
            raise StoreClosedError(f"sqlite store {self.path} is closed; cannot write {key}")
        if self._leader is None:
            raise NotLeaderError(
                f"cannot write {key}: this master has not campaigned on {self.path} yet "
                "(call campaign() first)"
            )
        if self._lost.is_set():
            raise StoreFencedError(
                f"cannot write {key}: this master lost the lock of {self.path} (its lock file "
                f"{self.lock_path} was removed or replaced); restart it"
            )

    # --- the thread hop ----------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        executor, slots = self._executor, self._slots
        if executor is None or slots is None:
            raise StoreClosedError(f"sqlite store {self.path} is closed; cannot {what}")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await slots.acquire()
                try:
                    cfut = executor.submit(fn, *args)
                except RuntimeError as exc:  # shut down by close() while we waited for a slot
                    slots.release()
                    raise StoreClosedError(
                        f"sqlite store {self.path} closed during {what}"
                    ) from exc

                def release(_: concurrent.futures.Future[T]) -> None:
                    # The slot is held until the thread is done with the call, not until we stop
                    # waiting for it, so the thread's backlog stays bounded by max_pending.
                    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                        loop.call_soon_threadsafe(slots.release)

                cfut.add_done_callback(release)
                return await asyncio.wrap_future(cfut)
        except TimeoutError as exc:
            raise StoreTimeoutError(
                f"sqlite store {self.path}: {what} did not complete within "
                f"{self._op_timeout_s:g} s, so its outcome is unknown (repeating a put with the "
                "same value is safe); check the disk under the database"
            ) from exc

    # --- on the store's thread ---------------------------------------------------------------

    def _open_sync(self, gen: int) -> None:
        if not self.path.parent.is_dir():
            raise StoreUnavailableError(
                f"cannot open sqlite store {self.path}: directory {self.path.parent} does not "
                "exist; create it or choose another --store path"
            )
        fd = self._lock_sync()
        try:
            conn = self._connect_sync()
        except BaseException:
            os.close(fd)
            raise
        if gen != self._gen:  # open() gave up on this call (timeout) and retired the thread
            _close_handles(conn, fd)
            raise StoreClosedError(f"sqlite store {self.path} was closed while it opened")
        self._conn, self._lock_fd = conn, fd

    def _lock_sync(self) -> int:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot open the lock file {self.lock_path} of sqlite store {self.path}: "
                f"{exc.strerror}; check the directory's permissions"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreLockedError(
                f"sqlite store {self.path} is in use by another master ({holder}): a sqlite "
                "store serves one master; stop that master first, or use etcd:// to run "
                "several"
            ) from exc
        except OSError as exc:
            os.close(fd)
            raise StoreUnavailableError(
                f"cannot lock {self.lock_path} of sqlite store {self.path}: {exc.strerror}"
            ) from exc
        _write_holder(fd, {"pid": os.getpid()})
        return fd

    def _connect_sync(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(
                f"cannot open sqlite store {self.path}: {exc}; check the path and permissions"
            ) from exc
        try:
            self._prepare_sync(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreFormatError(
                f"{self.path} is not a blockyard master store ({exc}); choose another --store "
                "path, or restore the database from a backup"
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare_sync(self, conn: sqlite3.Connection) -> None:
        """Create the schema in a new file, or check an existing one is ours; WAL, FULL."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        schema = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and schema == 0 and tables == 0:
            self._create_schema_sync(conn)
        elif app_id != APPLICATION_ID:
            raise StoreFormatError(
                f"{self.path} is an SQLite database of another application (application_id "
                f"{app_id:#x}), not a blockyard master store; choose another --store path"
            )
        elif schema > SCHEMA_VERSION:
            raise StoreFormatError(
                f"sqlite store {self.path} has schema version {schema}, newer than this "
                f"master's {SCHEMA_VERSION}; run the blockyard version that wrote it"
            )
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailableError(
                f"sqlite store {self.path} cannot use WAL mode (got {mode!r}); put it on a "
                "local filesystem"
            )
        conn.execute("PRAGMA synchronous=FULL")

    @staticmethod
    def _create_schema_sync(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        fd, self._lock_fd = self._lock_fd, None
        _close_handles(conn, fd)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreClosedError(f"sqlite store {self.path} is closed")
        return self._conn

    def _check_lock_sync(self, what: str) -> None:
        """The lock file must still be the one we locked (same device and inode)."""
        fd = self._lock_fd
        if fd is None:
            raise StoreClosedError(f"sqlite store {self.path} is closed; cannot {what}")
        held = os.fstat(fd)
        try:
            now = os.stat(self.lock_path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise StoreFencedError(
                f"cannot {what}: the lock file {self.lock_path} of sqlite store {self.path} was "
                "removed or replaced, so another master may own the database now; this master "
                "stops writing (restart it once only one master uses the database)"
            )

    def _campaign_sync(self, master_id: str, address: str) -> int:
        self._check_lock_sync("campaign")
        term = self._write_sync(lambda db: _bump(db, "term"))
        assert self._lock_fd is not None
        _write_holder(
            self._lock_fd,
            {"pid": os.getpid(), "master_id": master_id, "address": address, "term": term},
        )
        return term

    def _load_sync(self) -> Snapshot:
        db = self._db()
        try:
            db.execute("BEGIN")
            try:
                revision = _meta(db, "revision")
                rows = db.execute("SELECT kind, id, value, version FROM records").fetchall()
            finally:
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._io_error("load", exc) from exc
        records: dict[str, dict[str, StoredRecord]] = {}
        for kind, id_, value, version in rows:
            records.setdefault(kind, {})[id_] = StoredRecord(bytes(value), int(version))
        return Snapshot(records=records, revision=revision)

    def _put_sync(self, kind: str, id_: str, value: bytes, expect_version: int | None) -> int:
        key = f"{kind}/{id_}"
        self._check_lock_sync(f"put {key}")

        def txn(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT value, version FROM records WHERE kind = ? AND id = ?", (kind, id_)
            ).fetchone()
            current = None if row is None else int(row[1])
            if not _version_matches(expect_version, current):
                if row is not None and bytes(row[0]) == value:
                    return int(row[1])  # idempotent re-put: already holds these bytes
                raise _conflict(self.path, "put", key, expect_version, current)
            version = _bump(db, "revision")
            db.execute(
                "INSERT OR REPLACE INTO records (kind, id, value, version) VALUES (?, ?, ?, ?)",
                (kind, id_, value, version),
            )
            return version

        return self._write_sync(txn, what=f"put {key}")

    def _delete_sync(self, kind: str, id_: str, expect_version: int | None) -> None:
        key = f"{kind}/{id_}"
        self._check_lock_sync(f"delete {key}")

        def txn(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT version FROM records WHERE kind = ? AND id = ?", (kind, id_)
            ).fetchone()
            if row is None:
                return  # nothing to delete: a retried delete succeeds
            if not _version_matches(expect_version, int(row[0])):
                raise _conflict(self.path, "delete", key, expect_version, int(row[0]))
            _bump(db, "revision")
            db.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, id_))

        self._write_sync(txn, what=f"delete {key}")

    def _write_sync(self, txn: Callable[[sqlite3.Connection], T], *, what: str = "write") -> T:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._io_error(what, exc) from exc
        try:
            result = txn(db)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):  # the error below is what matters
                db.execute("ROLLBACK")
            raise self._io_error(what, exc) from exc
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def _io_error(self, what: str, exc: sqlite3.Error) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"sqlite store {self.path}: {what} failed ({exc}); nothing was written. Check the "
            "disk (space, permissions) under the database"
        )


def _close_handles(conn: sqlite3.Connection | None, fd: int | None) -> None:
    if conn is not None:
        conn.close()
    if fd is not None:
        os.close(fd)  # releases the flock


def _version_matches(expect_version: int | None, current: int | None) -> bool:
    if expect_version is None:
        return True
    if expect_version == 0:
        return current is None
    return current == expect_version


def _conflict(
    path: Path, op: str, key: str, expect_version: int | None, current: int | None
) -> StoreConflictError:
    assert expect_version is not None
    now = "does not exist" if current is None else f"is at version {current}"
    wanted = "not to exist" if expect_version == 0 else f"at version {expect_version}"
    return StoreConflictError(
        f"{op} {key} refused: expected it {wanted}, but it {now} in {path} (written by someone "
        "else since it was read); reload it and decide again",
        key=key,
        expected_version=expect_version,
        actual_version=current,
    )


def _meta(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise StoreFormatError(f"the master store lacks its {name!r} counter; it is damaged")
    return int(row[0])


def _bump(db: sqlite3.Connection, name: str) -> int:
    value = _meta(db, name) + 1
    db.execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))
    return value


def _write_holder(fd: int, info: dict[str, object]) -> None:
    """Record who holds the lock, for the message a second master prints. Best effort: the
    lock, not this text, is what excludes."""
    data = json.dumps(info, sort_keys=True).encode() + b"\n"
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, LOCK_INFO_MAX_BYTES, 0)
        info = json.loads(raw)
    except (OSError, ValueError):
        return "holder unknown"
    if not isinstance(info, dict):
        return "holder unknown"
    parts = [f"{k} {info[k]}" for k in ("master_id", "address", "pid") if k in info]
    return ", ".join(parts) or "holder unknown"
