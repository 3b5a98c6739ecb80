"""fileutil: short writes are continued or fail loudly, and state files are replaced atomically."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from blockyard.blockdev import BytesLike
from blockyard.errors import NoSpaceError, StorageIOError
from blockyard.fileutil import atomic_write, remaining_views, translate_os_error, write_fully


class ShortFile:
    """A file whose writes land ``step`` bytes at a time; then, past ``room``, ENOSPC."""

    def __init__(self, step: int, room: int = 1 << 30) -> None:
        self.data = bytearray()
        self.step = step
        self.room = room
        self.calls = 0

    def pwritev(self, buffers: Sequence[BytesLike], offset: int) -> int:
        self.calls += 1
        blob = b"".join(bytes(b) for b in buffers)
        if offset >= self.room:
            raise translate_os_error(OSError(errno.ENOSPC, "full"), "write")
        blob = blob[: min(self.step, self.room - offset)]
        end = offset + len(blob)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = blob
        return len(blob)


def test_write_fully_continues_after_short_writes() -> None:
    f = ShortFile(step=7)
    bufs = [b"a" * 10, memoryview(b"b" * 20), bytearray(b"c" * 5)]
    assert write_fully(f.pwritev, bufs, 3, what="t") == 35
    assert bytes(f.data[3:]) == b"a" * 10 + b"b" * 20 + b"c" * 5
    assert f.calls == 5


def test_write_fully_raises_when_space_runs_out_part_way() -> None:
    f = ShortFile(step=1 << 20, room=1000)
    with pytest.raises(NoSpaceError):
        write_fully(f.pwritev, [bytes(4096)], 0, what="t")
    assert len(f.data) == 1000  # what fit stays written; the caller must not count on it


def test_write_fully_refuses_no_progress() -> None:
    def stuck(buffers: Sequence[BytesLike], offset: int) -> int:
        del buffers, offset
        return 0

    with pytest.raises(StorageIOError, match="wrote 0 of 10"):
        write_fully(stuck, [bytes(10)], 0, what="t")


def test_remaining_views_skips_without_copying() -> None:
    a, b = bytearray(b"0123"), bytearray(b"4567")
    rest = remaining_views([a, b], 6)
    assert [bytes(v) for v in rest] == [b"67"]
    b[3] = ord("X")
    assert bytes(rest[0]) == b"6X"


def test_atomic_write_replaces_durably_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    atomic_write(str(path), b"new", mode=0o600)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_leaves_old_content_and_no_temp_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(StorageIOError):
        atomic_write(str(tmp_path / "missing-dir" / "state.json"), b"x")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
