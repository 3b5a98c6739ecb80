"""The etcd store on a three-member etcd cluster named by a multi-endpoint URL
(``etcd://a,b,c``): a member killed with kill -9 does not stop the store (the other two keep a
quorum and the client moves to them), and nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_proc import EtcdServer, start_etcd_cluster

from blockyard.errors import StoreUnavailableError
from blockyard.master.store import MasterStore
from blockyard.master.store_url import make_store

WAIT_S = 90.0
#: Writes retried after an unknown outcome (a Txn in flight on the killed member).
RETRIES = 20


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[EtcdServer]]:
    servers = start_etcd_cluster(tmp_path)
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_store_survives_a_killed_member(cluster: list[EtcdServer]) -> None:
    url = "etcd://" + ",".join(s.endpoint for s in cluster)

    async def put_retrying(store: MasterStore, name: str) -> int:
        for _ in range(RETRIES):
            try:
                return await store.put("volumes", name, name.encode(), expect_version=0)
            except StoreUnavailableError:
                await asyncio.sleep(0.2)  # unknown outcome: the idempotent re-put settles it
        pytest.fail(f"put {name} kept failing")

    async def main() -> dict[str, int]:
        store = make_store(url, election_ttl_s=3)
        await store.open()
        acked: dict[str, int] = {}
        try:
            await store.campaign("m", "m:1", timeout_s=30)
            for i in range(20):
                acked[f"v{i:02d}"] = await put_retrying(store, f"v{i:02d}")
            cluster[0].process.send_signal(signal.SIGKILL)
            cluster[0].process.wait(10)
            for i in range(20, 40):
                acked[f"v{i:02d}"] = await put_retrying(store, f"v{i:02d}")
            # Leadership survived: the lease was kept alive through the other members.
            assert store.is_leader
            snap = await store.load()
            assert {k: r.version for k, r in snap.volumes.items()} == acked
        finally:
            await store.close()
        return acked

    async def bounded() -> dict[str, int]:
        async with asyncio.timeout(WAIT_S):
            return await main()

    assert len(asyncio.run(bounded())) == 40
