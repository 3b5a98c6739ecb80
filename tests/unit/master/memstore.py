"""An in-memory MasterStore for unit tests (one leader, versions from a revision counter,
the idempotent re-put of store.py's contract)."""

from __future__ import annotations

import asyncio

from blockyard.errors import NotLeaderError, StoreConflictError
from blockyard.master.store import LeaderInfo, Snapshot, StoredRecord, record_key


class MemStore:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, StoredRecord]] = {}
        self.revision = 0
        self._leader: LeaderInfo | None = None
        self._lost = asyncio.Event()
        self.writes = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._leader = None
        self._lost.set()

    async def campaign(
        self, master_id: str, address: str, *, timeout_s: float | None = None
    ) -> None:
        self.revision += 1
        self._leader = LeaderInfo(master_id, address, self.revision)
        self._lost = asyncio.Event()

    def leader(self) -> LeaderInfo | None:
        return self._leader

    @property
    def is_leader(self) -> bool:
        return self._leader is not None

    @property
    def leadership_lost(self) -> asyncio.Event:
        return self._lost

    async def load(self) -> Snapshot:
        return Snapshot({k: dict(v) for k, v in self.records.items()}, self.revision)

    def _check(self, kind: str, id: str, expect: int | None, value: bytes | None) -> None:
        key = record_key(kind, id)
        if self._leader is None:
            raise NotLeaderError("not the leader")
        cur = self.records.get(kind, {}).get(id)
        actual = None if cur is None else cur.version
        if (
            expect is None
            or (expect == 0 and cur is None)
            or (cur is not None and expect == actual)
        ):
            return
        raise StoreConflictError(
            f"{key}: expected version {expect}, found {actual}",
            key=key,
            expected_version=expect,
            actual_version=actual,
        )

    async def put(self, kind: str, id: str, value: bytes, *, expect_version: int | None) -> int:
        cur = self.records.get(kind, {}).get(id)
        if cur is not None and cur.value == value:
            return cur.version
        self._check(kind, id, expect_version, value)
        self.revision += 1
        self.writes += 1
        self.records.setdefault(kind, {})[id] = StoredRecord(value, self.revision)
        return self.revision

    async def delete(self, kind: str, id: str, *, expect_version: int | None) -> None:
        if id not in self.records.get(kind, {}):
            return
        self._check(kind, id, expect_version, None)
        self.revision += 1
        del self.records[kind][id]
