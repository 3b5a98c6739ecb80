"""MasterClient over real gRPC: it finds the leader from a follower's redirect, skips a master
that does not answer, maps status codes to blockyard errors, and bounds the whole call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from blockyard.errors import InvalidArgumentError, NotFoundError, ServerUnavailableError
from blockyard.master.client import LEADER_METADATA_KEY, MasterClient, parse_masters
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.proto import master_pb2_grpc as mpb_grpc


class FakeMaster(mpb_grpc.MasterServicer):
    """Answers GetLeader/GetVolume as a leader, or redirects to ``leader`` as a follower."""

    def __init__(self, master_id: str, leader: str | None) -> None:
        self.master_id = master_id
        self.leader = leader
        self.calls = 0

    async def _redirect(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        assert self.leader is not None
        context.set_trailing_metadata(((LEADER_METADATA_KEY, self.leader),))
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, f"not the leader; the leader is {self.leader}"
        )

    async def GetLeader(
        self, request: mpb.GetLeaderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mpb.LeaderInfo:
        self.calls += 1
        if self.leader is not None:
            await self._redirect(context)
        return mpb.LeaderInfo(master_id=self.master_id, is_leader=True)

    async def GetVolume(
        self, request: mpb.MasterGetVolumeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> mpb.VolumeInfo:
        self.calls += 1
        await context.abort(grpc.StatusCode.NOT_FOUND, f"volume {request.name!r} does not exist")
        raise AssertionError("abort returns by raising")


@asynccontextmanager
async def serving(servicer: FakeMaster) -> AsyncIterator[str]:
    server = grpc.aio.server()
    mpb_grpc.add_MasterServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await coro

    asyncio.run(bounded())


def test_parse_masters() -> None:
    assert parse_masters("127.0.0.1:1, 10.0.0.2:9333") == ["127.0.0.1:1", "10.0.0.2:9333"]
    for bad in ("", ",", "host", "host:", ":80", "h:0", "h:70000", "h:x"):
        with pytest.raises(InvalidArgumentError):
            parse_masters(bad)


def test_a_follower_redirects_to_the_leader_and_the_client_remembers_it() -> None:
    async def body() -> None:
        leader = FakeMaster("m-leader", None)
        async with serving(leader) as leader_addr:
            follower = FakeMaster("m-follower", leader_addr)
            async with (
                serving(follower) as follower_addr,
                MasterClient([follower_addr, leader_addr]) as client,
            ):
                info = await client.get_leader()
                assert info.master_id == "m-leader" and info.is_leader
                assert (follower.calls, leader.calls) == (1, 1)
                await client.get_leader()  # straight to the leader now
                assert (follower.calls, leader.calls) == (1, 2)

    run(body())


def test_an_unreachable_master_is_skipped() -> None:
    async def body() -> None:
        leader = FakeMaster("m-leader", None)
        async with (
            serving(leader) as leader_addr,
            MasterClient(["127.0.0.1:1", leader_addr], timeout_s=10) as client,
        ):
            assert (await client.get_leader()).master_id == "m-leader"

    run(body())


def test_errors_map_to_blockyard_types_with_the_masters_message() -> None:
    async def body() -> None:
        async with serving(FakeMaster("m", None)) as addr, MasterClient([addr]) as client:
            with pytest.raises(NotFoundError, match="'nope' does not exist"):
                await client.get_volume("nope")

    run(body())


def test_no_master_answering_fails_within_the_deadline_naming_what_was_tried() -> None:
    async def body() -> None:
        async with MasterClient(["127.0.0.1:1"], timeout_s=1.5) as client:
            start = time.monotonic()
            with pytest.raises(ServerUnavailableError, match=r"no master answered.*127\.0\.0\.1:1"):
                await client.get_leader()
            assert time.monotonic() - start < 5

    run(body())
