"""Damaged bytes are reported — volume, file and offset — and never served as data.

Images are built on the fault model with the flusher off (so records stay in the WAL), written
to real files, damaged by flipping one bit, and opened with the real engine.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from blockyard.engine import VolumeStore, wal
from blockyard.engine import superblock as sbmod
from blockyard.engine.snapshot import ENTRY_BYTES, HEADER_AREA_BYTES
from blockyard.errors import CorruptionError
from blockyard.testing.faultfs import FaultFS

MIB = 1 << 20
ROOT = "/data"
VOL = f"{ROOT}/v/volume.blk"


def block(tag: int) -> bytes:
    return struct.pack("<Q", tag) * 512


def materialise(files: dict[str, bytes], tmp: Path) -> Path:
    for path, data in files.items():
        real = tmp / path.lstrip("/")
        real.parent.mkdir(parents=True, exist_ok=True)
        real.write_bytes(data)
    return tmp / ROOT.lstrip("/")


def flip(path: Path, offset: int, bit: int = 0) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def wal_records(image: bytes) -> list[tuple[int, wal.RecordHeader]]:
    """(file offset, header) of every intact record in the image's WAL region."""
    sb = sbmod.decode(image[:512], path="img", volume="v", file_size=len(image))
    out = []
    for pos in range(0, sb.wal_size, 512):
        raw = image[sb.wal_offset + pos : sb.wal_offset + pos + wal.HEADER_BYTES]
        hdr = wal.parse_header(raw, sb.wal_size, sb.size_bytes // 4096)
        if hdr is not None and hdr.kind is wal.Kind.WRITE:
            out.append((sb.wal_offset + pos, hdr))
    return sorted(out, key=lambda item: item[1].lsn)


def logged_volume(groups: int = 3, per_group: int = 4) -> dict[str, bytes]:
    """A durable image whose WAL holds ``groups`` flushed groups of writes, not checkpointed."""
    fs = FaultFS()
    store = VolumeStore(ROOT, fs=fs, background_flusher=False)
    vol = store.create("v", 4 * MIB, wal_size_bytes=1 * MIB)
    tag = 1
    for _ in range(groups):
        for _ in range(per_group):
            vol.write(tag * 8, block(tag))
            tag += 1
        vol.flush()
    return fs.durable_image()


@pytest.mark.parametrize("offset", [0, 9, 20, 33, 48, 57, 100, 130, 300, 507, 509])
def test_superblock_bit_flip_is_reported(tmp_path: Path, offset: int) -> None:
    root = materialise(logged_volume(), tmp_path)
    flip(root / "v" / "volume.blk", offset)
    with pytest.raises(CorruptionError, match="superblock") as info:
        VolumeStore(str(root)).open("v")
    assert info.value.volume == "v"
    assert info.value.path.endswith("volume.blk")


def test_mid_wal_damage_is_reported_with_its_offset(tmp_path: Path) -> None:
    image = logged_volume()
    records = wal_records(image[VOL])
    assert len(records) == 12
    # A record of the first flushed group: later groups' records carry a durable hint that
    # proves it had been synced, so this cannot be a torn write.
    victim_offset, victim = records[2]
    root = materialise(image, tmp_path)
    flip(root / "v" / "volume.blk", victim_offset + wal.HEADER_BYTES + 100, 3)
    with pytest.raises(CorruptionError, match=f"LSN {victim.lsn} is damaged") as info:
        VolumeStore(str(root)).open("v")
    assert info.value.offset == victim_offset
    assert info.value.volume == "v"


def test_damaged_header_of_a_synced_record_is_reported(tmp_path: Path) -> None:
    image = logged_volume()
    victim_offset, victim = wal_records(image[VOL])[5]
    root = materialise(image, tmp_path)
    flip(root / "v" / "volume.blk", victim_offset + 40, 1)  # the block number field
    with pytest.raises(CorruptionError, match=f"LSN {victim.lsn} is damaged"):
        VolumeStore(str(root)).open("v")


def test_damage_in_the_last_group_is_a_torn_tail(tmp_path: Path) -> None:
    """Nothing written after the last flush proves its records were durable, so damage there
    is indistinguishable from a torn write: the tail from the damaged record on is dropped and
    the volume opens with everything before it (a documented limit of one-sync commits)."""
    image = logged_volume()
    records = wal_records(image[VOL])
    victim_offset, victim = records[-2]
    root = materialise(image, tmp_path)
    flip(root / "v" / "volume.blk", victim_offset + wal.HEADER_BYTES + 8, 0)
    with VolumeStore(str(root)).open("v") as vol:
        for tag in range(1, victim.block):
            assert vol.read(tag * 8, 8) == block(tag)
        assert vol.read(victim.block * 8, 8) == bytes(4096)


def snapshot_image() -> dict[str, bytes]:
    fs = FaultFS()
    store = VolumeStore(ROOT, fs=fs, background_flusher=False)
    vol = store.create("v", 4 * MIB, wal_size_bytes=1 * MIB)
    for tag in range(1, 40):
        vol.write(tag * 8, block(tag))
    vol.create_snapshot("s")
    for batch in range(3):
        # Each checkpoint preserves the overwritten blocks in the delta and syncs them, so
        # later entries record how many earlier ones were durable.
        for tag in range(1 + batch * 10, 11 + batch * 10):
            vol.write(tag * 8, block(1000 + tag))
        vol._checkpoint()
    vol.flush()
    return fs.durable_image()


def delta_path(root: Path) -> Path:
    (delta,) = sorted((root / "v").glob("snap-*.cow"))
    return delta


def test_snapshot_header_damage_is_reported(tmp_path: Path) -> None:
    root = materialise(snapshot_image(), tmp_path)
    flip(delta_path(root), 30)
    with pytest.raises(CorruptionError, match="snapshot header"):
        VolumeStore(str(root)).open("v")


def test_durable_snapshot_entry_damage_is_reported(tmp_path: Path) -> None:
    root = materialise(snapshot_image(), tmp_path)
    flip(delta_path(root), HEADER_AREA_BYTES + 2 * ENTRY_BYTES + 16)
    with pytest.raises(CorruptionError, match="entry 2 is damaged") as info:
        VolumeStore(str(root)).open("v")
    assert info.value.offset == HEADER_AREA_BYTES + 2 * ENTRY_BYTES


def test_snapshot_data_damage_is_reported_on_read(tmp_path: Path) -> None:
    root = materialise(snapshot_image(), tmp_path)
    flip(delta_path(root), HEADER_AREA_BYTES + 512 + 1000)
    with VolumeStore(str(root)).open("v") as vol:
        info = vol.get_snapshot("s")
        assert info.delta_blocks == 30
        with pytest.raises(CorruptionError, match="fails its checksum") as err:
            vol.read_snapshot("s", 0, 4 * MIB // 512 // 2)
        assert err.value.offset == HEADER_AREA_BYTES + 512
        # The live volume is unaffected by damage in a snapshot's private copies.
        assert vol.read(8, 8) == block(1001)
