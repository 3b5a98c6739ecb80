"""IscsiConnection and MultipathSession against an in-process blockyard target on loopback:
login (None, CHAP, mutual CHAP, wrong secrets), SendTargets, answering target NOP-In pings,
ABORT TASK on a command timeout, NAA checks across paths, clean logout."""

from __future__ import annotations

import asyncio
import os

import pytest
from initiator_inproc import inproc_target, settings, target_name

from blockyard.attach.initiator import scsi
from blockyard.attach.initiator.connection import IscsiConnection, discover
from blockyard.attach.initiator.errors import (
    CommandTimeoutError,
    NoPathError,
    PathFailedError,
    PathIdentityError,
)
from blockyard.attach.initiator.multipath import MultipathSession
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.discovery import Portal
from blockyard.iscsi.errors import AuthenticationError, LoginRejectedError
from blockyard.iscsi.target_session import SessionLimits

TEST_TIMEOUT_S = 30
INITIATOR_CHAP = ChapCredentials("node-a", b"initiator-secret-1")
TARGET_CHAP = ChapCredentials("target-a", b"target-secret-222")


def run(coro: object) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            await coro  # type: ignore[misc]

    asyncio.run(bounded())


async def _roundtrip(conn: IscsiConnection) -> None:
    for _ in range(3):  # the first command of a new nexus reports POWER ON (29/00)
        outcome = await conn.execute(scsi.test_unit_ready())
        if outcome.status == 0:
            break
    data = os.urandom(65536)
    outcome = await conn.execute(scsi.write16(0, 128), data_out=data)
    assert outcome.status == 0
    outcome = await conn.execute(scsi.read16(0, 128), read_length=len(data))
    assert outcome.status == 0 and outcome.data == data


def test_login_without_auth_and_logout() -> None:
    async def body() -> None:
        async with inproc_target() as target:
            conn = await IscsiConnection.open(
                target.portal, settings(), target_name=target_name("vol")
            )
            assert conn.params.target_alias == "" and conn.alive
            await _roundtrip(conn)
            await conn.logout()
            assert not conn.alive
            with pytest.raises(PathFailedError):
                await conn.execute(scsi.test_unit_ready())

    run(body())


@pytest.mark.parametrize("mutual", [False, True])
def test_chap_login(mutual: bool) -> None:
    async def body() -> None:
        async with inproc_target(
            chap=INITIATOR_CHAP, mutual_chap=TARGET_CHAP if mutual else None
        ) as target:
            conn = await IscsiConnection.open(
                target.portal,
                settings(chap=INITIATOR_CHAP, target_chap=TARGET_CHAP if mutual else None),
                target_name=target_name("vol"),
            )
            await _roundtrip(conn)
            await conn.logout()

    run(body())


def test_chap_wrong_secret_is_refused_with_cause() -> None:
    async def body() -> None:
        async with inproc_target(chap=INITIATOR_CHAP) as target:
            wrong = ChapCredentials("node-a", b"not-the-right-secret")
            with pytest.raises(PathFailedError) as info:
                await IscsiConnection.open(
                    target.portal, settings(chap=wrong), target_name=target_name("vol")
                )
            assert isinstance(info.value.__cause__, LoginRejectedError)
            with pytest.raises(PathFailedError):
                # No credentials at all against a CHAP target.
                await IscsiConnection.open(
                    target.portal, settings(), target_name=target_name("vol")
                )

    run(body())


def test_mutual_chap_detects_an_impostor_target() -> None:
    async def body() -> None:
        impostor = ChapCredentials("target-a", b"impostor-secret-3")
        async with inproc_target(chap=INITIATOR_CHAP, mutual_chap=impostor) as target:
            with pytest.raises(PathFailedError) as info:
                await IscsiConnection.open(
                    target.portal,
                    settings(chap=INITIATOR_CHAP, target_chap=TARGET_CHAP),
                    target_name=target_name("vol"),
                )
            assert isinstance(info.value.__cause__, AuthenticationError)

    run(body())


def test_send_targets_discovery() -> None:
    async def body() -> None:
        async with inproc_target(("a", "b", "c")) as target:
            found = await discover(target.portal, settings())
            assert sorted(t.name for t in found) == [target_name(n) for n in ("a", "b", "c")]
            for entry in found:
                assert [(p.host, p.port) for p in entry.portals] == [
                    ("127.0.0.1", target.server.port)
                ]

    run(body())


def test_target_nop_in_pings_are_answered() -> None:
    """The target pings after 0.2 s of silence (checked on its 1 s tick) and drops us 0.5 s
    later unless we answer; a session idle for 3.5 s (three ping rounds) must survive on our
    answers alone, since our own keepalive is set far slower."""

    async def body() -> None:
        limits = SessionLimits(nop_interval_s=0.2, nop_timeout_s=0.5)
        async with inproc_target(limits=limits) as target:
            conn = await IscsiConnection.open(
                target.portal,
                settings(nop_interval_s=30.0, nop_timeout_s=30.0),
                target_name=target_name("vol"),
            )
            await asyncio.sleep(3.5)
            assert conn.alive
            await _roundtrip(conn)
            await conn.logout()

    run(body())


def test_command_timeout_aborts_the_task_and_keeps_the_session() -> None:
    async def body() -> None:
        async with inproc_target() as target:
            device = target.devices["vol"]
            conn = await IscsiConnection.open(
                target.portal,
                settings(command_timeout_s=0.3, tmf_timeout_s=5.0),
                target_name=target_name("vol"),
            )
            await _roundtrip(conn)
            device.gate.clear()
            loop = asyncio.get_running_loop()
            loop.call_later(0.8, device.gate.set)
            with pytest.raises(CommandTimeoutError):
                await conn.execute(scsi.write16(8, 8, fua=True), data_out=bytes(4096))
            assert conn.alive and conn.outstanding == 0
            await _roundtrip(conn)
            await conn.logout()

    run(body())


def test_unanswered_abort_fails_the_connection() -> None:
    async def body() -> None:
        async with inproc_target() as target:
            device = target.devices["vol"]
            conn = await IscsiConnection.open(
                target.portal,
                settings(command_timeout_s=0.2, tmf_timeout_s=0.3),
                target_name=target_name("vol"),
            )
            await _roundtrip(conn)
            device.gate.clear()
            with pytest.raises(PathFailedError):
                await conn.execute(scsi.write16(8, 8, fua=True), data_out=bytes(4096))
            assert not conn.alive
            device.gate.set()

    run(body())


def test_deep_queue_respects_the_window() -> None:
    """200 commands at once over a 16-command CmdSN window and a queue depth of 32."""

    async def body() -> None:
        async with inproc_target(limits=SessionLimits(command_window=16)) as target:
            conn = await IscsiConnection.open(
                target.portal, settings(queue_depth=32), target_name=target_name("vol")
            )
            await _roundtrip(conn)

            async def one(i: int) -> None:
                data = bytes([i % 251]) * 4096
                assert (await conn.execute(scsi.write16(i * 8, 8), data_out=data)).status == 0
                got = await conn.execute(scsi.read16(i * 8, 8), read_length=4096)
                assert got.data == data

            await asyncio.gather(*(one(i) for i in range(200)))
            await conn.logout()

    run(body())


def test_multipath_refuses_portals_of_different_volumes() -> None:
    """Two targets behind one portal stand in for two portals that export different volumes:
    the expected NAA (taken from another volume) must not match."""

    async def body() -> None:
        async with inproc_target(("a", "b")) as target:
            first = await MultipathSession.start([target.portal], target_name("a"), settings())
            naa_a = first.naa
            await first.close()
            with pytest.raises(PathIdentityError):
                await MultipathSession.start(
                    [target.portal], target_name("b"), settings(), expected_naa=naa_a
                )

    run(body())


def test_multipath_start_without_any_path_fails_fast() -> None:
    async def body() -> None:
        async with inproc_target() as target:
            port = target.server.port
        # The server is closed now: nothing listens on that port.
        with pytest.raises(NoPathError):
            await MultipathSession.start(
                [Portal("127.0.0.1", port)], target_name("vol"), settings()
            )

    run(body())
