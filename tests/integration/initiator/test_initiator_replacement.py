"""The replacement timeout: with no path, I/O queues for ``replacement_timeout_s`` and then
fails with a typed EIO error (NoPathError, a StorageIOError) in bounded time; a target that
comes back before the timeout gets the queued I/O completed instead."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from initiator_targets import TargetProcess, fast_settings, open_device

from blockyard.attach.initiator import NoPathError
from blockyard.errors import StorageIOError

REPLACEMENT_TIMEOUT_S = 3.0
#: Detection of the loss plus scheduling jitter on a busy 2-core machine.
SLACK_S = 4.0
RECOVERY_WAIT_S = 20.0


def _restart(tmp_path: Path, old: TargetProcess) -> TargetProcess:
    portal = old.portals[0]
    return TargetProcess(
        tmp_path / "data", listens=[f"{portal.host}:{portal.port}"], volumes=["vol1"]
    )


def _write_until_ok(device: object, lba: int, data: bytes) -> None:
    deadline = time.monotonic() + RECOVERY_WAIT_S
    while True:
        try:
            device.write(lba, data)  # type: ignore[attr-defined]
            return
        except NoPathError:
            assert time.monotonic() < deadline, "I/O did not resume after the target returned"
            time.sleep(0.1)


def test_io_fails_with_eio_after_replacement_timeout(tmp_path: Path) -> None:
    target = TargetProcess(tmp_path / "data", create=["vol1:16M"])
    restarted: TargetProcess | None = None
    try:
        with open_device(
            target.portals, "vol1", replacement_timeout_s=REPLACEMENT_TIMEOUT_S
        ) as device:
            before = os.urandom(4096)
            device.write(0, before, fua=True)
            target.stop()
            started = time.monotonic()
            with pytest.raises(NoPathError) as info:
                device.write(8, os.urandom(4096))
            elapsed = time.monotonic() - started
            assert isinstance(info.value, StorageIOError)
            assert REPLACEMENT_TIMEOUT_S - 1.0 <= elapsed <= REPLACEMENT_TIMEOUT_S + SLACK_S
            # Once the timeout has run out, further I/O fails at once rather than queueing.
            started = time.monotonic()
            with pytest.raises(NoPathError):
                device.read(0, 8)
            assert time.monotonic() - started < 1.0
            restarted = _restart(tmp_path, target)
            after = os.urandom(4096)
            _write_until_ok(device, 16, after)
            assert device.read(0, 8) == before
            assert device.read(16, 8) == after
    finally:
        for proc in (target, restarted):
            if proc is not None:
                proc.stop()


def test_io_resumes_when_target_returns_in_time(tmp_path: Path) -> None:
    target = TargetProcess(tmp_path / "data", create=["vol1:16M"])
    restarted: TargetProcess | None = None
    timeout_s = 8.0
    try:
        with open_device(target.portals, "vol1", replacement_timeout_s=timeout_s) as device:
            device.write(0, os.urandom(4096))
            target.stop()
            data = os.urandom(64 << 10)
            outcome: list[BaseException | None] = []

            def queued_write() -> None:
                try:
                    device.write(1024, data)
                    outcome.append(None)
                except BaseException as exc:
                    outcome.append(exc)

            writer = threading.Thread(target=queued_write)
            started = time.monotonic()
            writer.start()
            time.sleep(0.5)
            assert writer.is_alive(), "the write should be queued while no path exists"
            restarted = _restart(tmp_path, target)
            writer.join(timeout_s + SLACK_S)
            assert not writer.is_alive()
            assert outcome == [None], outcome
            assert time.monotonic() - started < timeout_s
            assert device.read(1024, 128) == data
    finally:
        for proc in (target, restarted):
            if proc is not None:
                proc.stop()


def test_hung_target_is_aborted_and_failed_in_bounded_time(tmp_path: Path) -> None:
    """SIGSTOP keeps TCP up but answers nothing: the command timeout, ABORT TASK, the TMF
    timeout and the NOP keepalive must still bring the failure home within the bound."""
    target = TargetProcess(tmp_path / "data", create=["vol1:16M"])
    settings = fast_settings(
        command_timeout_s=1.0, tmf_timeout_s=1.0, nop_interval_s=0.5, nop_timeout_s=1.0
    )
    try:
        with open_device(
            target.portals,
            "vol1",
            replacement_timeout_s=REPLACEMENT_TIMEOUT_S,
            settings=settings,
        ) as device:
            device.write(0, bytes(4096))
            os.kill(target.process.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(NoPathError):
                    device.write(8, os.urandom(4096))
                elapsed = time.monotonic() - started
                assert elapsed <= REPLACEMENT_TIMEOUT_S + 2 * 1.0 + SLACK_S
            finally:
                os.kill(target.process.pid, signal.SIGCONT)
            data = os.urandom(4096)
            _write_until_ok(device, 24, data)
            assert device.read(24, 8) == data
    finally:
        target.stop()
