"""Regression: every engine call that failed was logged as abandoned.

``VolumeManager._offload`` logged ``WARNING background engine call failed after its caller gave
up`` for *any* failed engine call, so ordinary validation errors (a shrink, a too-small size)
left that warning in the server log although the caller got the error and answered with it.
Only calls whose caller really stopped waiting (operation timeout, cancelled RPC) may be logged
that way, and those must still be logged, once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from blockyard.errors import BlockyardTimeoutError, InvalidSizeError, ShrinkRefusedError
from blockyard.server.iscsi_server import DictTargetRegistry, IscsiServer, ServerSettings
from blockyard.server.manager import PortalGroup, VolumeManager

T = TypeVar("T")
MIB = 1 << 20
ABANDONED = "after its caller gave up"
WAIT_S = 30.0


def run_with(
    data_dir: Path, body: Callable[[VolumeManager], Awaitable[T]], *, op_timeout_s: float = 120.0
) -> T:
    async def main() -> T:
        registry = DictTargetRegistry()
        server = IscsiServer(registry, "127.0.0.1", 0, settings=ServerSettings())
        group = PortalGroup(1, server, registry, "127.0.0.1")
        manager = VolumeManager(str(data_dir), [group], op_timeout_s=op_timeout_s)
        await manager.start()
        try:
            return await body(manager)
        finally:
            await manager.close(10)

    return asyncio.run(main())


def abandoned_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if ABANDONED in r.getMessage()]


def test_errors_the_caller_received_are_not_logged_as_abandoned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="blockyard.server.manager")

    async def body(m: VolumeManager) -> None:
        await m.create_volume("v", 4 * MIB)
        with pytest.raises(ShrinkRefusedError):
            await m.expand_volume("v", 2 * MIB)
        with pytest.raises(InvalidSizeError):
            await m.create_volume("small", 4096)
        # Let any done-callback that was scheduled run before we look.
        for _ in range(10):
            await asyncio.sleep(0)

    run_with(tmp_path, body)
    assert abandoned_lines(caplog) == []


def _blocked_failure(release: threading.Event, finished: threading.Event) -> None:
    try:
        assert release.wait(WAIT_S), "the test never released the engine call"
        raise ShrinkRefusedError("late failure nobody waits for")
    finally:
        finished.set()


async def _until_logged(caplog: pytest.LogCaptureFixture, finished: threading.Event) -> None:
    assert await asyncio.to_thread(finished.wait, WAIT_S)
    async with asyncio.timeout(WAIT_S):
        while not abandoned_lines(caplog):
            await asyncio.sleep(0.01)


def test_a_call_whose_caller_timed_out_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="blockyard.server.manager")
    release, finished = threading.Event(), threading.Event()

    async def body(m: VolumeManager) -> None:
        with pytest.raises(BlockyardTimeoutError, match="did not finish"):
            await m._offload(None, "a slow call", _blocked_failure, release, finished)
        assert abandoned_lines(caplog) == []  # still running: nothing to report yet
        release.set()
        await _until_logged(caplog, finished)

    run_with(tmp_path, body, op_timeout_s=0.05)
    lines = abandoned_lines(caplog)
    assert len(lines) == 1
    assert "late failure nobody waits for" in lines[0]


def test_a_call_whose_caller_was_cancelled_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="blockyard.server.manager")
    release, finished = threading.Event(), threading.Event()

    async def body(m: VolumeManager) -> None:
        task = asyncio.create_task(
            m._offload(None, "a slow call", _blocked_failure, release, finished)
        )
        await asyncio.sleep(0)  # one step: the task is now waiting on the engine call
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await _until_logged(caplog, finished)

    run_with(tmp_path, body)
    assert len(abandoned_lines(caplog)) == 1
