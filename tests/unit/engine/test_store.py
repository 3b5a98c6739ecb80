"""VolumeStore: create, open, list, info, delete, and reopening after close or a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from engine_helpers import MIB, block_of, random_bytes, read_all

from blockyard.engine import Role, VolumeStore
from blockyard.errors import (
    InvalidNameError,
    InvalidSizeError,
    VolumeBusyError,
    VolumeExistsError,
    VolumeNotFoundError,
)


def test_create_open_list_info(store: VolumeStore) -> None:
    vol = store.create("pvc-0001", 4 * MIB)
    assert vol.size_bytes == 4 * MIB
    assert vol.block_count == 4 * MIB // 512
    assert vol.epoch == 0
    assert vol.role is Role.NONE
    assert read_all(vol) == bytes(4 * MIB), "a new volume must read as zeros"
    store.create("pvc-0002", 8 * MIB, wal_size_bytes=128 * 1024).close()

    assert sorted(store.names()) == ["pvc-0001", "pvc-0002"]
    assert store.exists("pvc-0001")
    assert not store.exists("pvc-0003")
    infos = {i.name: i for i in store.list()}
    assert infos["pvc-0001"].uuid == vol.uuid
    assert infos["pvc-0002"].size_bytes == 8 * MIB
    assert infos["pvc-0002"].wal_size_bytes == 128 * 1024
    assert infos["pvc-0002"].snapshot_count == 0
    assert infos["pvc-0001"].created_ns > 0

    vol.write(0, block_of(1))
    vol.create_snapshot("s1")
    open_info = store.info("pvc-0001")
    vol.close()
    closed_info = store.info("pvc-0001")
    # Open and closed volumes are described from different sources; they must agree.
    assert open_info.uuid == closed_info.uuid
    assert open_info.snapshot_count == closed_info.snapshot_count == 1
    assert closed_info.allocated_bytes > 0


def test_reopen_after_close_keeps_data(store: VolumeStore) -> None:
    data = random_bytes(3 * MIB, seed=1)
    with store.create("v", 4 * MIB) as vol:
        vol.write(8, data)
        vol.write(4 * MIB // 512 - 1, b"\x77" * 512)
        uuid = vol.uuid
    with store.open("v") as vol:
        assert vol.uuid == uuid
        assert vol.read(8, len(data) // 512) == data
        assert vol.read(vol.block_count - 1, 1) == b"\x77" * 512
        assert vol.read(0, 8) == bytes(4096)


def test_reopen_in_a_new_store_keeps_data(tmp_path: Path) -> None:
    first = VolumeStore(str(tmp_path))
    with first.create("v", 2 * MIB) as vol:
        vol.write(0, block_of(9, 4))
    with VolumeStore(str(tmp_path)).open("v") as vol:
        assert vol.read(0, 32) == block_of(9, 4)


def test_create_existing_name_is_refused(store: VolumeStore) -> None:
    store.create("v", 2 * MIB).close()
    with pytest.raises(VolumeExistsError, match="delete it first or pick another name"):
        store.create("v", 2 * MIB)
    with pytest.raises(VolumeExistsError):
        store.create("v", 4 * MIB)
    assert store.info("v").size_bytes == 2 * MIB, "a refused create must not touch the volume"


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-dash", "a/b", "a b", "x" * 129, "caf\u00e9", "../up", "a\x00b"]
)
def test_invalid_volume_names(store: VolumeStore, name: str) -> None:
    with pytest.raises(InvalidNameError, match=r"use 1 to 128 characters from A-Z a-z 0-9"):
        store.create(name, 2 * MIB)
    assert store.names() == []


@pytest.mark.parametrize(
    "name", ["a", "A.b_c-9", "pvc-3f1c2a8e-0d4b-4c1e-9a6b-0123456789ab", "x" * 128]
)
def test_valid_volume_names(store: VolumeStore, name: str) -> None:
    store.create(name, 1 * MIB).close()
    assert store.names() == [name]


@pytest.mark.parametrize(
    ("size", "hint"),
    [
        (0, "use 1048576"),
        (MIB - 4096, "use 1048576"),
        (MIB + 1, f"use {MIB + 4096}"),
        (2 * MIB + 512, f"use {2 * MIB + 4096}"),
        (16 << 40, "use 1048576"),
        (-4096, "use 1048576"),
    ],
)
def test_invalid_volume_sizes(store: VolumeStore, size: int, hint: str) -> None:
    with pytest.raises(InvalidSizeError, match=hint):
        store.create("v", size)
    assert store.names() == []


@pytest.mark.parametrize("wal_size", [32 * 1024, 64 * 1024 + 512, (1 << 30) + 4096])
def test_invalid_wal_sizes(store: VolumeStore, wal_size: int) -> None:
    with pytest.raises(InvalidSizeError, match="must be a multiple of 4096 between"):
        store.create("v", 4 * MIB, wal_size_bytes=wal_size)
    assert store.names() == []


def test_second_open_in_same_store_is_refused(store: VolumeStore) -> None:
    vol = store.create("v", 2 * MIB)
    with pytest.raises(VolumeBusyError, match="already open"):
        store.open("v")
    vol.close()
    store.open("v").close()


def test_open_missing_volume(store: VolumeStore) -> None:
    with pytest.raises(VolumeNotFoundError, match="blockyard volume list"):
        store.open("nope")
    with pytest.raises(VolumeNotFoundError):
        store.info("nope")


def test_delete_removes_every_file(store: VolumeStore, tmp_path: Path) -> None:
    vol = store.create("v", 4 * MIB)
    vol.write(0, block_of(1, 16))
    for i in range(3):
        vol.create_snapshot(f"s{i}")
        vol.write(0, block_of(2 + i, 16))
    vol.close()
    assert any(p.name.endswith(".cow") for p in (tmp_path / "data" / "v").iterdir())
    store.create("keep", 1 * MIB).close()

    store.delete("v")
    assert store.names() == ["keep"]
    # Nothing of the volume may remain: no directory, no snapshot deltas, no trash.
    assert sorted(os.listdir(tmp_path / "data")) == ["keep"]
    assert not store.exists("v")


def test_delete_is_idempotent(store: VolumeStore) -> None:
    store.delete("never-existed")
    store.create("v", 1 * MIB).close()
    store.delete("v")
    store.delete("v")
    assert store.names() == []
    # The name is free again.
    with store.create("v", 1 * MIB) as vol:
        assert vol.read(0, 8) == bytes(4096)


def test_delete_open_volume_is_refused(store: VolumeStore) -> None:
    vol = store.create("v", 1 * MIB)
    vol.write(0, block_of(3))
    with pytest.raises(VolumeBusyError, match="close it"):
        store.delete("v")
    assert vol.read(0, 8) == block_of(3)
    vol.close()
    store.delete("v")
    assert store.names() == []


def test_leftovers_of_interrupted_create_and_delete_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    VolumeStore(str(root)).create("v", 1 * MIB).close()
    (root / ".tmp-half-made-1234").mkdir()
    (root / ".tmp-half-made-1234" / "volume.blk").write_bytes(b"partial")
    (root / ".trash-gone-abcd").mkdir()
    store = VolumeStore(str(root))
    assert sorted(os.listdir(root)) == ["v"]
    assert store.names() == ["v"]


# ---- crashes: a real process that dies without closing ----------------------------------------

_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from blockyard.engine import VolumeStore

    root, mode = sys.argv[1], sys.argv[2]
    store = VolumeStore(root)
    vol = store.open("v")
    for i in range(64):
        vol.write(i * 64, bytes([i + 1]) * 4096)
    vol.flush()
    # Written but never flushed: survives a process crash (page cache), not power loss.
    vol.write(8, b"\\xaa" * 512)
    vol.unmap(63 * 64, 8)
    vol.write(64 * 64, bytes(range(256)) * 16 * 64, fua=True)
    sys.stdout.write("written\\n")
    sys.stdout.flush()
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)
    """
)


@pytest.mark.parametrize("mode", ["exit", "kill"])
def test_reopen_after_process_crash_keeps_acknowledged_writes(tmp_path: Path, mode: str) -> None:
    root = str(tmp_path / "data")
    store = VolumeStore(root)
    store.create("v", 8 * MIB, wal_size_bytes=256 * 1024).close()

    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, root, mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.stdout == "written\n", proc.stderr
    assert proc.returncode == (-signal.SIGKILL if mode == "kill" else 0), proc.stderr

    tail = bytes(range(256)) * 16 * 64
    with VolumeStore(root).open("v") as vol:
        for i in range(63):
            assert vol.read(i * 64, 8) == bytes([i + 1]) * 4096, f"LBA {i * 64} lost"
        assert vol.read(63 * 64, 8) == bytes(4096), "an unmap was lost by a process crash"
        assert vol.read(8, 1) == b"\xaa" * 512, "an unflushed write was lost by a process crash"
        assert vol.read(9, 7) == bytes(7 * 512)
        assert vol.read(64 * 64, len(tail) // 512) == tail
        # Writing after recovery must not resurrect or clobber anything.
        vol.write(0, b"\x55" * 4096)
        vol.flush()
    with VolumeStore(root).open("v") as vol:
        assert vol.read(0, 8) == b"\x55" * 4096
        assert vol.read(8, 1) == b"\xaa" * 512
        assert vol.read(64 * 64, len(tail) // 512) == tail


_HOLD_SCRIPT = textwrap.dedent(
    """
    import sys
    from blockyard.engine import VolumeStore

    vol = VolumeStore(sys.argv[1]).open("v")
    sys.stdout.write("open\\n")
    sys.stdout.flush()
    sys.stdin.readline()
    vol.close()
    """
)


def test_volume_open_in_another_process_is_busy(tmp_path: Path) -> None:
    root = str(tmp_path / "data")
    VolumeStore(root).create("v", 1 * MIB).close()
    with subprocess.Popen(
        [sys.executable, "-c", _HOLD_SCRIPT, root],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            assert proc.stdout.readline() == "open\n"
            store = VolumeStore(root)
            with pytest.raises(VolumeBusyError, match="open in another process"):
                store.open("v")
            with pytest.raises(VolumeBusyError):
                store.delete("v")
        finally:
            proc.stdin.write("\n")
            proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    VolumeStore(root).open("v").close()
