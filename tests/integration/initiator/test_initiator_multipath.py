"""Multipath with ALUA against ONE target process listening on two addresses, each its own
target port group (standalone ``--listen`` twice, ``--control-stdin``).

While a writer thread writes and verifies continuously, the active group moves back and forth
and then the active portal's listener dies: the writer must see no error and every write must
read back intact."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from initiator_targets import TargetProcess, open_device

from blockyard.scsi.alua import AccessState

WRITER_JOIN_TIMEOUT_S = 60
PATH_WAIT_S = 15


@pytest.fixture
def two_portals(tmp_path: Path) -> TargetProcess:
    proc = TargetProcess(
        tmp_path / "data",
        listens=["127.0.0.1:0", "127.0.0.2:0"],
        create=["mp:64M"],
        control=True,
    )
    yield proc  # type: ignore[misc]
    proc.stop()


class Writer(threading.Thread):
    """Writes unique 8 KiB records sequentially, reading each back; records any error."""

    def __init__(self, device: object) -> None:
        super().__init__(daemon=True)
        self.device = device
        self.stop_flag = threading.Event()
        self.errors: list[BaseException] = []
        self.written: dict[int, bytes] = {}

    def run(self) -> None:
        device = self.device
        lba = 0
        try:
            while not self.stop_flag.is_set():
                data = os.urandom(8192)
                device.write(lba, data)  # type: ignore[attr-defined]
                assert device.read(lba, 16) == data  # type: ignore[attr-defined]
                self.written[lba] = data
                lba = (lba + 16) % (1 << 16)
        except BaseException as exc:
            self.errors.append(exc)

    def count(self) -> int:
        return len(self.written)


def _wait_progress(writer: Writer, more: int = 20) -> None:
    target = writer.count() + more
    deadline = time.monotonic() + PATH_WAIT_S
    while writer.count() < target and not writer.errors:
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.02)


def _wait_paths(device: object, connected: int) -> None:
    deadline = time.monotonic() + PATH_WAIT_S
    while sum(p.connected for p in device.paths()) != connected:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, device.paths()  # type: ignore[attr-defined]
        time.sleep(0.05)


def test_same_naa_on_both_portals_and_alua_states(two_portals: TargetProcess) -> None:
    with open_device(two_portals.portals, "mp") as device:
        paths = device.paths()
        assert [p.connected for p in paths] == [True, True]
        assert [p.group_id for p in paths] == [1, 2]
        assert [p.state for p in paths] == [AccessState.ACTIVE_OPTIMIZED, AccessState.STANDBY]
        assert len(device.naa) == 32


def test_writer_survives_alua_moves_and_portal_loss(two_portals: TargetProcess) -> None:
    with open_device(two_portals.portals, "mp", replacement_timeout_s=20) as device:
        writer = Writer(device)
        writer.start()
        try:
            _wait_progress(writer)
            two_portals.control("active 2")
            _wait_progress(writer)
            assert device.paths()[1].state == AccessState.ACTIVE_OPTIMIZED
            two_portals.control("active 1")
            _wait_progress(writer)
            # The active portal dies mid-write; the standby one is promoted a moment later.
            two_portals.control("down 1")
            time.sleep(0.3)
            two_portals.control("active 2")
            _wait_progress(writer)
            assert device.paths()[0].connected is False
            # The lost portal comes back and its path reconnects in the background.
            two_portals.control("up 1")
            _wait_paths(device, 2)
            _wait_progress(writer)
        finally:
            writer.stop_flag.set()
            writer.join(WRITER_JOIN_TIMEOUT_S)
        assert not writer.is_alive()
        assert not writer.errors, repr(writer.errors[0])
        assert writer.count() > 100
        for lba, data in writer.written.items():
            assert device.read(lba, 16) == data, f"record at LBA {lba} did not survive"
