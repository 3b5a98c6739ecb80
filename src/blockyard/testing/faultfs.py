"""A fault-injecting model of files under power loss, for crash-consistency tests.

It implements :class:`blockyard.engine.fileio.VolumeFS` in memory. Reads see every write at
once (like the page cache). ``fdatasync`` makes a file's earlier writes durable. At any moment
:meth:`FaultFS.crash_image` answers "what could the disk hold if power failed right now?":

- everything made durable by an ``fdatasync`` survives;
- every write since the file's last ``fdatasync`` may be lost, applied, or torn: it is split at
  512-byte sector boundaries (hole punches at 4 KiB block boundaries) and each piece
  independently lands or not, in a random order — so pieces may also land *out of order*;
- a pending size change lands or not.

Directory operations (create, rename, remove) are durable when they return, as the real
:class:`~blockyard.engine.fileio.OsFS` makes them by fsyncing the directory.

Running out of space is modelled as a real filesystem does it: the model tracks which 4 KiB
pages of each file are allocated (written and not punched since). While :attr:`FaultFS.full` is
set, a write that reaches an unallocated page writes everything before that page and returns a
short count, and the next call fails with ``NoSpaceError`` — exactly what ``pwritev`` did on the
tmpfs where a flushed write was once lost. Overwriting allocated pages (the preallocated WAL,
the superblock) never fails. Writes go through the engine's own
:func:`~blockyard.engine.fileio.write_fully`, so the crash suite exercises it.

The model never raises in the middle of an operation; a test runs a workload, takes crash
images at chosen points (``on_op`` hook), writes them to real files and opens them with the
real engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from blockyard.blockdev import BytesLike
from blockyard.errors import NoSpaceError
from blockyard.fileutil import write_fully

SECTOR = 512
PUNCH_GRAIN = 4096
#: Allocation granularity of the model (a page).
PAGE = 4096


@dataclass
class _Op:
    kind: str  # "write" | "punch" | "truncate"
    offset: int
    data: bytes = b""
    length: int = 0


@dataclass
class _Node:
    durable: bytearray = field(default_factory=bytearray)
    current: bytearray = field(default_factory=bytearray)
    pending: list[_Op] = field(default_factory=list)
    #: Pages written and not punched since (what would need no new space to overwrite).
    allocated: set[int] = field(default_factory=set)


class FaultFile:
    def __init__(self, fs: FaultFS, path: str, node: _Node) -> None:
        self._fs = fs
        self.path = path
        self._node = node
        self._closed = False

    def _tick(self) -> None:
        self._fs._tick()

    def pread(self, length: int, offset: int) -> bytes:
        cur = self._node.current
        data = bytes(cur[offset : offset + length])
        return data + bytes(length - len(data))

    def preadv(self, buffers: Sequence[memoryview | bytearray], offset: int) -> int:
        total = 0
        for b in buffers:
            n = len(b)
            b[:] = self.pread(n, offset + total)
            total += n
        return total

    def preadv_nowait(self, buffers: Sequence[memoryview | bytearray], offset: int) -> int | None:
        """The model is all "page cache": a read never waits."""
        return self.preadv(buffers, offset)

    def _raw_pwritev(self, buffers: Sequence[BytesLike], offset: int) -> int:
        """One ``pwritev`` system call of the model: may write short when space runs out."""
        data = b"".join(bytes(b) for b in buffers)
        if self._fs.space_limit is not None and offset + len(data) > self._fs.space_limit:
            raise NoSpaceError(f"{self.path}: model disk full at {offset + len(data)}")
        if not data:
            return 0
        node = self._node
        first_page, last_page = offset // PAGE, (offset + len(data) - 1) // PAGE
        if self._fs.full:
            for page in range(first_page, last_page + 1):
                if page not in node.allocated:
                    room = max(0, page * PAGE - offset)
                    if room == 0:
                        self._fs.enospc_count += 1
                        raise NoSpaceError(f"{self.path}: model disk full at page {page}")
                    data = data[:room]
                    last_page = page - 1
                    self._fs.short_write_count += 1
                    break
        self._tick()
        cur = node.current
        end = offset + len(data)
        if end > len(cur):
            cur.extend(bytes(end - len(cur)))
        cur[offset:end] = data
        node.pending.append(_Op("write", offset, data))
        node.allocated.update(range(first_page, last_page + 1))
        return len(data)

    def pwritev(self, buffers: Sequence[BytesLike], offset: int) -> int:
        return write_fully(self._raw_pwritev, buffers, offset, what=f"write {self.path}")

    def pwrite(self, data: BytesLike, offset: int) -> int:
        return self.pwritev([data], offset)

    def fdatasync(self) -> None:
        if self._fs.sync_error is not None:
            raise self._fs.sync_error
        self._tick()
        node = self._node
        node.durable = bytearray(node.current)
        node.pending.clear()
        self._fs.sync_count += 1

    def punch_hole(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self._tick()
        cur = self._node.current
        end = min(offset + length, len(cur))
        if end > offset:
            cur[offset:end] = bytes(end - offset)
        self._node.pending.append(_Op("punch", offset, length=length))
        # Only whole pages inside the range are freed.
        self._node.allocated.difference_update(
            range((offset + PAGE - 1) // PAGE, (offset + length) // PAGE)
        )

    def write_zeros(self, offset: int, length: int) -> None:
        self.pwritev([bytes(length)], offset)

    def truncate(self, size: int) -> None:
        self._tick()
        cur = self._node.current
        if size < len(cur):
            del cur[size:]
            self._node.allocated = {p for p in self._node.allocated if p * PAGE < size}
        else:
            cur.extend(bytes(size - len(cur)))
        self._node.pending.append(_Op("truncate", size))

    def size(self) -> int:
        return len(self._node.current)

    def allocated_bytes(self) -> int:
        return len(self._node.current)

    def next_data(self, offset: int) -> int:
        # Conservative, as SEEK_DATA may be: everything before EOF counts as data.
        return offset if offset < len(self._node.current) else -1

    def next_hole(self, offset: int) -> int:
        return max(offset, len(self._node.current))

    def lock_exclusive(self) -> None:
        return

    def drop_cache(self) -> None:
        return

    def close(self) -> None:
        self._closed = True


def _crash_content(node: _Node, rng: random.Random) -> bytes:
    img = bytearray(node.durable)
    pieces: list[tuple[int, bytes | None, int]] = []
    sizes: list[int] = []
    for op in node.pending:
        if op.kind == "write":
            pos = op.offset
            end = op.offset + len(op.data)
            while pos < end:
                nxt = min(end, (pos // SECTOR + 1) * SECTOR)
                pieces.append((pos, op.data[pos - op.offset : nxt - op.offset], 0))
                pos = nxt
        elif op.kind == "punch":
            pos = op.offset
            end = op.offset + op.length
            while pos < end:
                nxt = min(end, (pos // PUNCH_GRAIN + 1) * PUNCH_GRAIN)
                pieces.append((pos, None, nxt - pos))
                pos = nxt
        else:
            sizes.append(op.offset)
    # Each piece lands or not, and those that land do so in any order.
    mode = rng.random()
    if mode < 0.15:
        chosen = []
    elif mode < 0.3:
        chosen = list(pieces)
    else:
        chosen = [p for p in pieces if rng.random() < 0.5]
    rng.shuffle(chosen)
    if sizes and rng.random() < 0.5:
        size = sizes[-1]
        if size < len(img):
            del img[size:]
        else:
            img.extend(bytes(size - len(img)))
    for pos, data, length in chosen:
        n = len(data) if data is not None else length
        if pos + n > len(img):
            img.extend(bytes(pos + n - len(img)))
        img[pos : pos + n] = data if data is not None else bytes(n)
    return bytes(img)


class FaultFS:
    """An in-memory :class:`~blockyard.engine.fileio.VolumeFS` that can produce crash images."""

    def __init__(self, *, space_limit: int | None = None) -> None:
        self._files: dict[str, _Node] = {}
        self._dirs: set[str] = {"/"}
        self.ops = 0
        self.sync_count = 0
        self.space_limit = space_limit
        #: While set, writes that need a new page fail as on a full filesystem (module doc).
        self.full = False
        self.short_write_count = 0
        self.enospc_count = 0
        #: When set, every ``fdatasync`` raises it (a device that fails write-back).
        self.sync_error: Exception | None = None
        #: Called before every mutating file operation with the operation number.
        self.on_op: Callable[[int], None] | None = None

    def _tick(self) -> None:
        self.ops += 1
        if self.on_op is not None:
            self.on_op(self.ops)

    def crash_image(self, rng: random.Random) -> dict[str, bytes]:
        """Possible disk contents if power failed now: path → bytes, for every file."""
        return {path: _crash_content(node, rng) for path, node in sorted(self._files.items())}

    def durable_image(self) -> dict[str, bytes]:
        return {path: bytes(node.durable) for path, node in sorted(self._files.items())}

    def restore(self, path: str, data: bytes) -> None:
        """Make ``path`` hold ``data`` durably, as after a power cycle: pages that hold only
        zeros count as holes (unallocated), as in the sparse file the image came from."""
        node = _Node(bytearray(data), bytearray(data))
        node.allocated = {i // PAGE for i in range(0, len(data), PAGE) if any(data[i : i + PAGE])}
        self._files[path] = node

    # ---- VolumeFS ------------------------------------------------------------------------

    def open(self, path: str, *, create: bool = False) -> FaultFile:
        node = self._files.get(path)
        if node is None:
            if not create:
                raise FileNotFoundError(path)
            node = _Node()
            self._files[path] = node
        elif create:
            raise FileExistsError(path)
        return FaultFile(self, path, node)

    def exists(self, path: str) -> bool:
        return path in self._files or path in self._dirs

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        names = {
            p[len(prefix) :].split("/", 1)[0]
            for p in (*self._files, *self._dirs)
            if p.startswith(prefix) and p != prefix
        }
        return sorted(names)

    def mkdir(self, path: str) -> None:
        parts = path.rstrip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._dirs.add("/".join(parts[:i]) or "/")

    def rename(self, src: str, dst: str) -> None:
        src_prefix = src.rstrip("/") + "/"
        if src in self._files:
            self._files[dst] = self._files.pop(src)
            return
        for p in [p for p in self._files if p.startswith(src_prefix)]:
            self._files[dst + "/" + p[len(src_prefix) :]] = self._files.pop(p)
        for d in [d for d in self._dirs if d == src or d.startswith(src_prefix)]:
            self._dirs.discard(d)
            self._dirs.add(dst + d[len(src) :])

    def remove(self, path: str) -> None:
        self._files.pop(path, None)

    def rmtree(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        for p in [p for p in self._files if p.startswith(prefix)]:
            del self._files[p]
        self._dirs = {d for d in self._dirs if d != path and not d.startswith(prefix)}

    def free_bytes(self, path: str) -> int:
        del path
        if self.space_limit is None:
            return 1 << 40
        return max(0, self.space_limit - sum(len(n.current) for n in self._files.values()))
