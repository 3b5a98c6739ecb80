"""The attached /dev/loopN passes the BlockDevice conformance suite end to end:
loop (direct I/O) -> FUSE file -> SectorFile -> engine volume, in a separate daemon process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count

from attach_helpers import AttachEnv, LoopBlockDevice, losetup_json

from blockyard.attach import manager
from blockyard.attach.source import LocalSource
from blockyard.blockdev import BlockDevice
from blockyard.engine import VolumeStore
from blockyard.testing.blockdev import check_block_device

SIZE_BYTES = 16 << 20


def test_loop_device_passes_block_device_conformance(attach_env: AttachEnv) -> None:
    store = VolumeStore(attach_env.data_dir)
    names = count()
    seen_devices: list[str] = []

    @contextmanager
    def factory() -> Iterator[BlockDevice]:
        name = f"conf{next(names)}"
        store.create(name, SIZE_BYTES).close()
        state = manager.attach(LocalSource(attach_env.data_dir, name), state_root=attach_env.root)
        assert state.loop_device is not None
        seen_devices.append(state.loop_device)
        dev = LoopBlockDevice(state.loop_device, state.backing_file)
        try:
            yield dev
        finally:
            dev.close()
            manager.detach(state.id, state_root=attach_env.root)

    check_block_device(factory)
    assert len(seen_devices) >= 12
    # Every device was attached with direct I/O and is gone again.
    assert not any(d["name"] in seen_devices for d in losetup_json())


def test_loop_device_is_direct_io_and_discards(attach_env: AttachEnv) -> None:
    VolumeStore(attach_env.data_dir).create("dio", SIZE_BYTES).close()
    state = manager.attach(LocalSource(attach_env.data_dir, "dio"), state_root=attach_env.root)
    try:
        row = next(d for d in losetup_json() if d["name"] == state.loop_device)
        assert row["dio"] is True
        assert row["back-file"] == state.backing_file
        assert state.loop_device is not None
        name = state.loop_device.removeprefix("/dev/")
        with open(f"/sys/block/{name}/queue/discard_max_bytes") as f:
            assert int(f.read()) > 0, "discard must reach the volume as unmap"
    finally:
        manager.detach(state.id, state_root=attach_env.root)
