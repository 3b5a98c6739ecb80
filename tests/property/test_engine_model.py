"""The engine against a plain model: a bytearray per volume and a dict of snapshot images.

A small WAL (64-256 KiB) on an 8 MiB volume makes every run wrap the WAL and hit back-pressure;
unmaps above 256 physical blocks take the direct hole-punch path.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from blockyard.engine import Volume, VolumeStore

MIB = 1 << 20
SECTOR = 512
VOLUME_BYTES = 8 * MIB
GROW_LIMIT_BYTES = 12 * MIB
SNAPSHOT_LIMIT = 4
#: The engine logs unmaps up to 256 physical blocks (2048 LBAs); above that it punches directly.
DIRECT_UNMAP_LBAS = 256 * 8


def _read_all(vol: Volume) -> bytes:
    step = vol.max_transfer_blocks
    n = vol.block_count
    return b"".join(vol.read(lba, min(step, n - lba)) for lba in range(0, n, step))


def _read_snapshot_all(vol: Volume, name: str, size_bytes: int) -> bytes:
    step = vol.max_transfer_blocks
    n = size_bytes // SECTOR
    return b"".join(vol.read_snapshot(name, lba, min(step, n - lba)) for lba in range(0, n, step))


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="blockyard-model-")
        self.store = VolumeStore(self.root)
        self.model = bytearray()
        self.snapshots: dict[str, bytes] = {}
        self.names = itertools.count()
        self.vol: Volume | None = None

    @property
    def v(self) -> Volume:
        assert self.vol is not None
        return self.vol

    @property
    def lba_count(self) -> int:
        return len(self.model) // SECTOR

    @initialize(wal_kib=st.sampled_from([64, 128, 256]))
    def create(self, wal_kib: int) -> None:
        self.vol = self.store.create("v", VOLUME_BYTES, wal_size_bytes=wal_kib * 1024)
        self.model = bytearray(VOLUME_BYTES)

    def _range(self, data: st.DataObject, max_count: int) -> tuple[int, int]:
        n = self.lba_count
        where = data.draw(st.sampled_from(["any", "aligned", "last"]), label="where")
        if where == "last":
            count = data.draw(st.integers(1, min(max_count, 16)), label="count")
            return n - count, count
        if where == "aligned":
            blocks = data.draw(st.integers(1, max(1, max_count // 8)), label="blocks")
            first = data.draw(st.integers(0, n // 8 - blocks), label="block")
            return first * 8, blocks * 8
        count = data.draw(st.integers(1, max_count), label="count")
        lba = data.draw(st.integers(0, n - count), label="lba")
        return lba, count

    # ---- data path --------------------------------------------------------------------------

    @rule(data=st.data(), fill=st.integers(1, 255), fua=st.booleans())
    def write(self, data: st.DataObject, fill: int, fua: bool) -> None:
        lba, count = self._range(data, 40)
        # A per-sector pattern: misplaced sectors cannot hide behind a uniform fill.
        payload = b"".join(
            bytes([fill, (lba + i) & 0xFF, ((lba + i) >> 8) & 0xFF]) * 170 + b"\x00\x00"
            for i in range(count)
        )
        self.v.write(lba, payload, fua=fua)
        self.model[lba * SECTOR : (lba + count) * SECTOR] = payload

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        lba, count = self._range(data, 64)
        assert self.v.read(lba, count) == self.model[lba * SECTOR : (lba + count) * SECTOR]

    @rule(data=st.data(), large=st.booleans())
    def unmap(self, data: st.DataObject, large: bool) -> None:
        if large:
            count = data.draw(st.integers(DIRECT_UNMAP_LBAS + 1, DIRECT_UNMAP_LBAS + 3000))
            lba = data.draw(st.integers(0, self.lba_count - count))
        else:
            lba, count = self._range(data, 64)
        self.v.unmap(lba, count)
        self.model[lba * SECTOR : (lba + count) * SECTOR] = bytes(count * SECTOR)

    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        lba, count = self._range(data, 64)
        self.v.write_zeroes(lba, count)
        self.model[lba * SECTOR : (lba + count) * SECTOR] = bytes(count * SECTOR)

    @rule()
    def flush(self) -> None:
        self.v.flush()

    # ---- snapshots --------------------------------------------------------------------------

    @precondition(lambda self: len(self.snapshots) < SNAPSHOT_LIMIT)
    @rule()
    def create_snapshot(self) -> None:
        name = f"snap-{next(self.names)}"
        info = self.v.create_snapshot(name)
        assert info.size_bytes == len(self.model)
        self.snapshots[name] = bytes(self.model)

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def read_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        image = self.snapshots[name]
        n = len(image) // SECTOR
        count = data.draw(st.integers(1, 64), label="count")
        lba = data.draw(st.sampled_from([0, n - count, None]), label="at")
        if lba is None:
            lba = data.draw(st.integers(0, n - count), label="lba")
        got = self.v.read_snapshot(name, lba, count)
        assert got == image[lba * SECTOR : (lba + count) * SECTOR], f"snapshot {name}"

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def delete_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        self.v.delete_snapshot(name)
        del self.snapshots[name]

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def restore_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        self.v.restore_snapshot(name)
        image = self.snapshots[name]
        self.model[: len(image)] = image
        self.model[len(image) :] = bytes(len(self.model) - len(image))

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot")
        clone_name = f"clone-{next(self.names)}"
        clone = self.store.clone(self.v, name, clone_name)
        try:
            assert clone.size_bytes == len(self.snapshots[name])
            assert _read_all(clone) == self.snapshots[name], f"clone of {name}"
            # Independence: writing the clone changes neither the source nor its snapshot.
            clone.write(0, b"\xc1" * 4096)
        finally:
            clone.close()
        self.store.delete(clone_name)
        assert self.v.read(0, 8) == self.model[:4096]
        assert self.v.read_snapshot(name, 0, 8) == self.snapshots[name][:4096]

    # ---- size and lifecycle -----------------------------------------------------------------

    @precondition(lambda self: len(self.model) < GROW_LIMIT_BYTES)
    @rule(blocks=st.integers(1, 256))
    def grow(self, blocks: int) -> None:
        new_size = min(len(self.model) + blocks * 4096, GROW_LIMIT_BYTES)
        self.v.grow(new_size)
        self.model.extend(bytes(new_size - len(self.model)))

    @rule()
    def reopen(self) -> None:
        self.v.close()
        self.vol = self.store.open("v")

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def geometry_matches(self) -> None:
        if self.vol is not None:
            assert self.vol.size_bytes == len(self.model)
            assert self.vol.block_count == self.lba_count

    @invariant()
    def snapshots_match(self) -> None:
        if self.vol is not None:
            listed = {s.name: s.size_bytes for s in self.vol.list_snapshots()}
            assert listed == {n: len(img) for n, img in self.snapshots.items()}

    @invariant()
    def edges_match(self) -> None:
        if self.vol is not None:
            n = self.lba_count
            assert self.vol.read(0, 16) == self.model[: 16 * SECTOR]
            assert self.vol.read(n - 16, 16) == self.model[(n - 16) * SECTOR :]

    def teardown(self) -> None:
        try:
            if self.vol is not None and not self.vol.closed:
                assert _read_all(self.vol) == self.model, "final volume contents"
                for name, image in self.snapshots.items():
                    got = _read_snapshot_all(self.vol, name, len(image))
                    assert got == image, f"final view of snapshot {name}"
                self.vol.close()
                # Everything must also come back from disk.
                with self.store.open("v") as vol:
                    assert _read_all(vol) == self.model, "contents after the final reopen"
        finally:
            self.store.close_all()
            shutil.rmtree(self.root, ignore_errors=True)


TestEngineModel = EngineModel.TestCase
