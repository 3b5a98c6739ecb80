"""Multipath failover driven through the management API of a real `blockyard serve`.

One server listens on two addresses, each its own target port group. The userspace initiator
logs in on both; a writer thread writes and reads back continuously while the API's
SetPortState moves the active/optimized group from one portal to the other and back. The writer
must see no error and every write must read back intact at the end."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from blockyard.attach.initiator import IscsiBlockDevice
from blockyard.scsi.alua import AccessState
from blockyard.server.backend import VolumeDescription
from blockyard.server.client import VolumeServerClient
from blockyard.testing.serve import ServeProcess, serve_process

PROGRESS_TIMEOUT_S = 20.0
INITIATOR = "iqn.2026-11.io.blockyard.test:multipath-serve"
RECORD_BLOCKS = 16  # 8 KiB records of 512-byte blocks


def api_call(served: ServeProcess, fn: Callable[[VolumeServerClient], Awaitable[object]]) -> object:
    async def main() -> object:
        async with VolumeServerClient(served.api, timeout_s=20, slow_timeout_s=60) as client:
            return await fn(client)

    return asyncio.run(main())


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServeProcess]:
    with serve_process(
        tmp_path / "data", tmp_path / "serve.log", ["127.0.0.1:0", "127.0.0.2:0"]
    ) as proc:
        yield proc


class Writer(threading.Thread):
    def __init__(self, device: IscsiBlockDevice) -> None:
        super().__init__(daemon=True)
        self.device = device
        self.stop_flag = threading.Event()
        self.errors: list[BaseException] = []
        self.written: dict[int, bytes] = {}

    def run(self) -> None:
        lba = 0
        try:
            while not self.stop_flag.is_set():
                data = os.urandom(RECORD_BLOCKS * 512)
                self.device.write(lba, data)
                if self.device.read(lba, RECORD_BLOCKS) != data:
                    raise AssertionError(f"read-back mismatch at LBA {lba}")
                self.written[lba] = data
                lba = (lba + RECORD_BLOCKS) % (1 << 16)
        except BaseException as exc:  # the test asserts there were none
            self.errors.append(exc)

    def progress(self, more: int = 30) -> None:
        target = len(self.written) + more
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        while len(self.written) < target:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "the writer made no progress"
            time.sleep(0.02)


def _set(served: ServeProcess, group: int, state: AccessState) -> None:
    api_call(served, lambda c: c.set_port_state("mp", group, state))


def test_active_group_moves_through_the_api_without_io_errors(served: ServeProcess) -> None:
    desc = api_call(served, lambda c: c.create_volume("mp", 64 << 20))
    assert isinstance(desc, VolumeDescription)
    _set(served, 2, AccessState.STANDBY)
    iqn = desc.export.iqn
    device = IscsiBlockDevice.connect(served.portals, iqn, INITIATOR, replacement_timeout_s=20.0)
    writer = Writer(device)
    try:
        writer.start()
        writer.progress()
        for active, standby in ((2, 1), (1, 2), (2, 1)):
            # Old group first: for a moment no group is optimized, so the initiator must hold
            # its I/O (within the replacement timeout) and re-check until the new one is.
            _set(served, standby, AccessState.STANDBY)
            _set(served, active, AccessState.ACTIVE_OPTIMIZED)
            writer.progress()
            # The initiator noticed: it now sees the new group optimized and the old one standby.
            states = {p.group_id: p.state for p in device.paths()}
            assert states == {
                active: AccessState.ACTIVE_OPTIMIZED,
                standby: AccessState.STANDBY,
            }, states
        writer.stop_flag.set()
        writer.join(60)
        assert not writer.is_alive()
        assert not writer.errors, writer.errors
        assert len(writer.written) > 100
        for lba, data in writer.written.items():
            assert device.read(lba, RECORD_BLOCKS) == data, f"LBA {lba} lost"
    finally:
        writer.stop_flag.set()
        device.close()
