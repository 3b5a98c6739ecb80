"""The userspace initiator against a real target process: the BlockDevice conformance suite,
and data integrity under each way of moving write data (immediate, unsolicited, R2T)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from initiator_targets import TargetProcess, fast_settings, open_device

from blockyard.attach.initiator import IscsiBlockDevice
from blockyard.blockdev import BlockDevice
from blockyard.testing.blockdev import CHECKS, check_block_device

VOLUME_SIZE = "8M"


def test_check_block_device_over_iscsi(tmp_path: Path) -> None:
    """Every conformance check gets a fresh, never-written volume of its own."""
    names = [f"conf{i}" for i in range(len(CHECKS))]
    proc = TargetProcess(tmp_path / "data", create=[f"{n}:{VOLUME_SIZE}" for n in names])
    fresh = iter(names)
    opened: list[IscsiBlockDevice] = []

    def factory() -> tuple[BlockDevice, Callable[[], None]]:
        device = open_device(proc.portals, next(fresh))
        opened.append(device)
        return device, device.close

    try:
        check_block_device(factory)
        assert len(opened) == len(CHECKS)
    finally:
        for device in opened:
            device.close()
        proc.stop()


_MODES = {
    "immediate+unsolicited": {"immediate_data": True, "initial_r2t": False},
    "immediate-then-r2t": {"immediate_data": True, "initial_r2t": True},
    "r2t-only": {"immediate_data": False, "initial_r2t": True},
    "small-segments": {"max_recv_data_segment_length": 4096, "first_burst_length": 8192},
}


@pytest.mark.parametrize("mode", list(_MODES))
def test_write_paths_keep_data(target: TargetProcess, mode: str) -> None:
    """1 MiB writes cross FirstBurstLength, MaxBurstLength and the target's segment size, so
    every Data-Out path (immediate, unsolicited, several R2Ts) carries real bytes."""
    settings = fast_settings(**_MODES[mode])
    with open_device(target.portals, "vol1", settings=settings) as device:
        assert device.max_transfer_blocks * device.logical_block_size >= 1 << 20
        blocks = (1 << 20) // device.logical_block_size
        for step, lba in zip(itertools.count(), (0, 4096, 77)):
            data = os.urandom(blocks * device.logical_block_size)
            device.write(lba, data, fua=step == 1)
            assert device.read(lba, blocks) == data, f"{mode}: mismatch at LBA {lba}"
        device.flush()
