"""The master store conformance suite: one set of checks that both stores pass, ``sqlite://``
(a real database file) and ``etcd://`` (a real etcd-server started by the fixture)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from etcd_proc import EtcdServer

from blockyard.errors import (
    InvalidArgumentError,
    NotLeaderError,
    StoreClosedError,
    StoreConflictError,
)
from blockyard.master.store import MAX_VALUE_BYTES, MasterStore
from blockyard.master.store_url import make_store

T = TypeVar("T")
#: Bound on one test's asyncio part (generous: a shared 2-core machine).
TEST_TIMEOUT_S = 60.0

StoreFactory = Callable[[], MasterStore]


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(params=["sqlite", "etcd"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Makes unopened stores that all see the same data."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/master.db"
    else:
        server: EtcdServer = request.getfixturevalue("etcd_server")
        url = server.url(request.getfixturevalue("etcd_prefix"))
    return lambda: make_store(url, election_ttl_s=2)


async def leading(factory: StoreFactory, master_id: str = "m1") -> MasterStore:
    store = factory()
    await store.open()
    await store.campaign(master_id, f"{master_id}.example:9400", timeout_s=30)
    return store


def with_leader(factory: StoreFactory, body: Callable[[MasterStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = await leading(factory)
        try:
            return await body(store)
        finally:
            await store.close()

    return run(main())


def test_crud(new_store: StoreFactory) -> None:
    async def body(store: MasterStore) -> None:
        assert store.is_leader
        leader = store.leader()
        assert leader is not None
        assert (leader.master_id, leader.address) == ("m1", "m1.example:9400")
        v1 = await store.put("volumes", "vol-a", b'{"size": 1}', expect_version=0)
        s1 = await store.put("servers", "srv-1", b"server one", expect_version=None)
        snap = await store.load()
        assert {k: (r.value, r.version) for k, r in snap.volumes.items()} == {
            "vol-a": (b'{"size": 1}', v1)
        }
        assert {k: (r.value, r.version) for k, r in snap.servers.items()} == {
            "srv-1": (b"server one", s1)
        }
        v2 = await store.put("volumes", "vol-a", b'{"size": 2}', expect_version=v1)
        assert v2 > v1
        assert (await store.load()).volumes["vol-a"].value == b'{"size": 2}'
        await store.delete("volumes", "vol-a", expect_version=v2)
        snap = await store.load()
        assert dict(snap.volumes) == {}
        assert set(snap.servers) == {"srv-1"}
        await store.delete("servers", "srv-1", expect_version=None)
        assert dict((await store.load()).records) == {}

    with_leader(new_store, body)


def test_versions_grow_per_key_across_delete_and_recreate(new_store: StoreFactory) -> None:
    async def body(store: MasterStore) -> None:
        v1 = await store.put("volumes", "v", b"one", expect_version=0)
        v2 = await store.put("volumes", "v", b"two", expect_version=None)
        await store.delete("volumes", "v", expect_version=v2)
        v3 = await store.put("volumes", "v", b"one", expect_version=0)
        assert 0 < v1 < v2 < v3
        # A version from before the delete never matches the re-created record.
        with pytest.raises(StoreConflictError) as info:
            await store.put("volumes", "v", b"stale", expect_version=v1)
        assert (info.value.expected_version, info.value.actual_version) == (v1, v3)
        snap = await store.load()
        assert snap.revision >= v3
        assert snap.volumes["v"].version == v3

    with_leader(new_store, body)


def test_conflicts(new_store: StoreFactory) -> None:
    async def body(store: MasterStore) -> None:
        v1 = await store.put("volumes", "v", b"one", expect_version=0)
        with pytest.raises(StoreConflictError) as info:
            await store.put("volumes", "v", b"other", expect_version=0)
        assert (info.value.key, info.value.actual_version) == ("volumes/v", v1)
        with pytest.raises(StoreConflictError) as info:
            await store.put("volumes", "absent", b"x", expect_version=v1)
        assert info.value.actual_version is None
        with pytest.raises(StoreConflictError):
            await store.put("volumes", "v", b"other", expect_version=v1 + 1000)
        with pytest.raises(StoreConflictError):
            await store.delete("volumes", "v", expect_version=v1 + 1000)
        with pytest.raises(StoreConflictError):
            await store.delete("volumes", "v", expect_version=0)
        # Nothing refused changed anything.
        snap = await store.load()
        assert set(snap.volumes) == {"v"}
        assert (snap.volumes["v"].value, snap.volumes["v"].version) == (b"one", v1)

    with_leader(new_store, body)


def test_idempotent_reput_and_delete(new_store: StoreFactory) -> None:
    async def body(store: MasterStore) -> None:
        v1 = await store.put("volumes", "v", b"create", expect_version=0)
        # A create retried (after an unknown outcome, or a restart) finds its own record.
        assert await store.put("volumes", "v", b"create", expect_version=0) == v1
        v2 = await store.put("volumes", "v", b"update", expect_version=v1)
        # The update retried with the version it was based on: already applied.
        assert await store.put("volumes", "v", b"update", expect_version=v1) == v2
        assert (await store.load()).volumes["v"].version == v2
        # Different bytes are a real conflict.
        with pytest.raises(StoreConflictError):
            await store.put("volumes", "v", b"something else", expect_version=v1)
        # An unconditional put always writes.
        v3 = await store.put("volumes", "v", b"update", expect_version=None)
        assert v3 > v2
        await store.delete("volumes", "v", expect_version=v3)
        await store.delete("volumes", "v", expect_version=v3)  # retried delete
        await store.delete("volumes", "never-was", expect_version=None)
        assert dict((await store.load()).volumes) == {}

    with_leader(new_store, body)


def test_load_after_reopen(new_store: StoreFactory) -> None:
    async def main() -> None:
        store = await leading(new_store)
        written = {}
        for i in range(150):  # more than one etcd load page
            name = f"vol-{i:03d}"
            written[name] = (
                name.encode() * 3,
                await store.put("volumes", name, name.encode() * 3, expect_version=0),
            )
        server_version = await store.put("servers", "s1", b"\x00\xffbinary", expect_version=0)
        await store.close()

        again = new_store()
        await again.open()
        try:
            snap = await again.load()  # a follower (not campaigned) may load
            assert {k: (r.value, r.version) for k, r in snap.volumes.items()} == written
            assert (snap.servers["s1"].value, snap.servers["s1"].version) == (
                b"\x00\xffbinary",
                server_version,
            )
            await again.campaign("m2", "m2.example:9400", timeout_s=30)
            assert (
                await again.put("volumes", "vol-000", b"new", expect_version=written["vol-000"][1])
                > server_version
            )
        finally:
            await again.close()

    run(main())


def test_writes_need_leadership_and_an_open_store(new_store: StoreFactory) -> None:
    async def main() -> None:
        store = new_store()
        await store.open()
        try:
            assert not store.is_leader
            with pytest.raises(NotLeaderError):
                await store.put("volumes", "v", b"x", expect_version=0)
            with pytest.raises(NotLeaderError):
                await store.delete("volumes", "v", expect_version=None)
            await store.campaign("m1", "a:1", timeout_s=30)
            await store.put("volumes", "v", b"x", expect_version=0)
        finally:
            await store.close()
        assert store.leadership_lost.is_set()
        assert not store.is_leader
        with pytest.raises(StoreClosedError):
            await store.put("volumes", "v", b"y", expect_version=None)
        with pytest.raises(StoreClosedError):
            await store.load()

    run(main())


def test_bad_keys_and_values_are_refused(new_store: StoreFactory) -> None:
    async def body(store: MasterStore) -> None:
        for kind, id_ in [("volumes", "a/b"), ("volumes", ""), ("Vol", "x"), ("volumes", "../x")]:
            with pytest.raises(InvalidArgumentError):
                await store.put(kind, id_, b"x", expect_version=None)
        with pytest.raises(InvalidArgumentError):
            await store.put("volumes", "big", b"x" * (MAX_VALUE_BYTES + 1), expect_version=None)
        with pytest.raises(InvalidArgumentError):
            await store.put("volumes", "v", b"x", expect_version=-1)
        # The largest value goes through whole.
        big = bytes(range(256)) * (MAX_VALUE_BYTES // 256)
        await store.put("volumes", "big", big, expect_version=0)
        assert (await store.load()).volumes["big"].value == big

    with_leader(new_store, body)


def test_concurrent_creates_of_one_name_one_wins(new_store: StoreFactory) -> None:
    async def body(store: MasterStore) -> None:
        results = await asyncio.gather(
            *(store.put("volumes", "race", f"{i}".encode(), expect_version=0) for i in range(8)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, int)]
        assert len(winners) == 1, results
        assert all(isinstance(r, StoreConflictError) for r in results if not isinstance(r, int))

    with_leader(new_store, body)


def test_campaign_again_while_leading_returns_at_once(new_store: StoreFactory) -> None:
    async def main() -> None:
        store = await leading(new_store)
        waiting_on = store.leadership_lost
        await body(store)
        await store.close()
        assert waiting_on.is_set()  # a waiter from before the second campaign hears the loss

    async def body(store: MasterStore) -> None:
        first = store.leader()
        await store.campaign("m1", "m1.example:9400", timeout_s=5)
        again = store.leader()
        assert store.is_leader
        assert first is not None and again is not None
        assert again.token >= first.token
        assert not store.leadership_lost.is_set()
        await store.put("volumes", "v", b"x", expect_version=0)

    run(main())
