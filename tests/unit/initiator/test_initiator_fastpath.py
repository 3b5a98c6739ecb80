"""MultipathSession.submit, the coroutine-free path IscsiBlockDevice uses for every I/O:
completion, fallback to the slow path when the queue or the CmdSN window is full, command
timeout (ABORT TASK, then re-issue), and cancellation by the caller."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from initiator_inproc import inproc_target, settings, target_name

from blockyard.attach.initiator import scsi
from blockyard.attach.initiator.blockdev import IscsiBlockDevice, IscsiVolumeSpec
from blockyard.attach.initiator.connection import CommandOutcome
from blockyard.attach.initiator.errors import NoPathError
from blockyard.attach.initiator.multipath import MultipathSession, MultipathSettings
from blockyard.iscsi.target_session import SessionLimits

TEST_TIMEOUT_S = 30

Result = tuple[CommandOutcome | None, BaseException | None]


def run(coro: object) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT_S):
            await coro  # type: ignore[misc]

    asyncio.run(bounded())


async def submit(session: MultipathSession, cdb: bytes, **kwargs: object) -> Result:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Result] = loop.create_future()
    session.submit(
        cdb,
        lambda outcome, error: future.set_result((outcome, error)),
        command="test",
        **kwargs,  # type: ignore[arg-type]
    )
    session.flush()
    return await future


def test_submit_many_over_a_small_window_and_queue() -> None:
    """More commands than the CmdSN window and the queue depth: the excess waits in the slow
    path, everything completes, data round-trips."""

    async def body() -> None:
        async with inproc_target(limits=SessionLimits(command_window=4)) as target:
            session = await MultipathSession.start(
                [target.portal], target_name("vol"), settings(queue_depth=8)
            )
            try:
                blobs = [os.urandom(4096) for _ in range(64)]
                writes = [
                    submit(session, scsi.write16(i * 8, 8), data_out=memoryview(blob))
                    for i, blob in enumerate(blobs)
                ]
                for outcome, error in await asyncio.gather(*writes):
                    assert error is None and outcome is not None and outcome.status == 0
                buffers = [memoryview(bytearray(4096)) for _ in blobs]
                reads = [
                    submit(session, scsi.read16(i * 8, 8), read_into=buf)
                    for i, buf in enumerate(buffers)
                ]
                for outcome, error in await asyncio.gather(*reads):
                    assert error is None and outcome is not None and outcome.transferred == 4096
                assert [bytes(b) for b in buffers] == blobs
                conn = session._paths[0].conn
                assert conn is not None and conn.outstanding == 0
                assert conn._free_slots == 8 and not conn._fast
            finally:
                await session.close()

    run(body())


def test_submit_timeout_aborts_and_reissues() -> None:
    """A command that outlives command_timeout_s is aborted (ABORT TASK); the path is failed
    and reconnected, and the command is re-issued and completes once the target answers."""

    async def body() -> None:
        async with inproc_target() as target:
            device = target.devices["vol"]
            session = await MultipathSession.start(
                [target.portal],
                target_name("vol"),
                settings(command_timeout_s=0.3, tmf_timeout_s=5.0),
                MultipathSettings(replacement_timeout_s=10.0, reconnect_backoff_initial_s=0.05),
            )
            try:
                device.gate.clear()
                asyncio.get_running_loop().call_later(0.8, device.gate.set)
                data = os.urandom(4096)
                outcome, error = await submit(
                    session, scsi.write16(16, 8, fua=True), data_out=memoryview(data)
                )
                assert error is None and outcome is not None and outcome.status == 0
                outcome, error = await submit(session, scsi.read16(16, 8), read_length=4096)
                assert outcome is not None and outcome.data == data
            finally:
                await session.close()

    run(body())


def test_submit_timeout_past_the_replacement_timeout_fails() -> None:
    async def body() -> None:
        async with inproc_target() as target:
            device = target.devices["vol"]
            session = await MultipathSession.start(
                [target.portal],
                target_name("vol"),
                settings(command_timeout_s=0.2, tmf_timeout_s=0.3),
                MultipathSettings(replacement_timeout_s=0.5, reconnect_backoff_initial_s=0.05),
            )
            try:
                device.gate.clear()
                outcome, error = await submit(
                    session, scsi.write16(16, 8, fua=True), data_out=memoryview(bytes(4096))
                )
                assert outcome is None and error is not None
                assert "replacement timeout" in str(error) or "no usable path" in str(error)
            finally:
                device.gate.set()
                await session.close()

    run(body())


def test_cancelled_submission_is_aborted_and_releases_its_slot() -> None:
    async def body() -> None:
        async with inproc_target() as target:
            device = target.devices["vol"]
            session = await MultipathSession.start(
                [target.portal], target_name("vol"), settings(queue_depth=4)
            )
            try:
                calls: list[Result] = []
                device.gate.clear()
                sub = session.submit(
                    scsi.write16(16, 8, fua=True),
                    lambda outcome, error: calls.append((outcome, error)),
                    command="test",
                    data_out=memoryview(bytes(4096)),
                )
                session.flush()
                await asyncio.sleep(0.2)
                conn = session._paths[0].conn
                assert conn is not None and conn.outstanding == 1
                sub.cancel()
                device.gate.set()
                for _ in range(100):
                    if conn.outstanding == 0:
                        break
                    await asyncio.sleep(0.02)
                assert conn.outstanding == 0 and conn._free_slots == 4 and conn.alive
                assert calls == []
                outcome, error = await submit(session, scsi.read16(0, 8), read_length=4096)
                assert error is None and outcome is not None
            finally:
                device.gate.set()
                await session.close()

    run(body())


def test_facade_caller_timeout_cancels_the_command() -> None:
    """IscsiBlockDevice: a caller that gives up (its call timeout) gets NoPathError, the
    command is aborted on the loop before the call returns, and the device keeps working."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    async def serve() -> None:
        async with inproc_target() as target:
            holder["target"] = target
            ready.set()
            while not holder.get("stop"):
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        target = holder["target"]
        spec = IscsiVolumeSpec(
            (target.portal,),  # type: ignore[attr-defined]
            target_name("vol"),
            "iqn.2026-11.io.blockyard.test:unit",
            initiator=settings(command_timeout_s=20.0),
        )
        with IscsiBlockDevice(spec) as dev:
            device = target.devices["vol"]  # type: ignore[attr-defined]
            dev._call_timeout_s = 0.3
            device.gate.clear()
            try:
                with pytest.raises(NoPathError):
                    dev.write(16, bytes(4096), fua=True)
            finally:
                device.gate.set()
            dev._call_timeout_s = 20.0
            assert dev.read(0, 8) == bytes(4096)
            dev.write(24, b"x" * 4096)
            assert dev.read(24, 8) == b"x" * 4096
            assert not dev._inflight and not dev._pending
    finally:
        holder["stop"] = True
        thread.join(10)
        loop.close()
