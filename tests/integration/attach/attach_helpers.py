"""Helpers for attach integration tests: a BlockDevice over /dev/loopN, leak snapshots, the CLI."""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from blockyard.attach import loop as loopmod
from blockyard.attach import mounts
from blockyard.blockdev import BytesLike, LbaStatus
from blockyard.errors import MisalignedError, OutOfRangeError, TransferTooLargeError

#: linux/fs.h
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
CLI_TIMEOUT_S = 120.0


class LoopBlockDevice:
    """The attached /dev/loopN as a BlockDevice: O_DIRECT I/O, fsync as the flush barrier.

    Discard and zero-out go through the block layer ioctls (loop turns them into fallocate on
    the FUSE file); provisioning is read with SEEK_DATA/SEEK_HOLE on the FUSE file.
    """

    logical_block_size = 512
    physical_block_size = 4096
    max_transfer_blocks = 2048

    def __init__(self, device: str, backing_file: str) -> None:
        self._fd = os.open(device, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        self._backing = os.open(backing_file, os.O_RDONLY | os.O_CLOEXEC)
        self.block_count = os.lseek(self._fd, 0, os.SEEK_END) // 512
        self._buf = mmap.mmap(-1, self.max_transfer_blocks * 512)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._backing)
        self._buf.close()

    def _check(self, lba: int, count: int, *, cap: bool = True) -> None:
        if lba < 0 or count < 0 or lba + count > self.block_count:
            raise OutOfRangeError(f"LBA range {lba}+{count} is outside 0..{self.block_count}")
        if cap and count > self.max_transfer_blocks:
            raise TransferTooLargeError(f"{count} blocks > {self.max_transfer_blocks}")

    def read(self, lba: int, block_count: int) -> bytes:
        self._check(lba, block_count)
        out = bytearray(block_count * 512)
        self.readinto(lba, memoryview(out))
        return bytes(out)

    def readinto(self, lba: int, buf: memoryview) -> None:
        if len(buf) % 512:
            raise MisalignedError(f"buffer of {len(buf)} bytes is not whole blocks")
        count = len(buf) // 512
        self._check(lba, count)
        n = os.preadv(self._fd, [memoryview(self._buf)[: len(buf)]], lba * 512)
        assert n == len(buf), f"short read {n}"
        buf[:] = self._buf[: len(buf)]

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        if len(data) % 512:
            raise MisalignedError(f"{len(data)} bytes is not whole blocks")
        count = len(data) // 512
        self._check(lba, count)
        self._buf[: len(data)] = bytes(data)
        n = os.pwritev(self._fd, [memoryview(self._buf)[: len(data)]], lba * 512)
        assert n == len(data), f"short write {n}"
        if fua:
            self.flush()

    def _range_ioctl(self, request: int, lba: int, count: int) -> None:
        self._check(lba, count, cap=False)
        if count:
            fcntl.ioctl(self._fd, request, struct.pack("QQ", lba * 512, count * 512))

    def unmap(self, lba: int, block_count: int) -> None:
        # BLKZEROOUT (write-zeroes with NOUNMAP) reaches the file as FALLOC_FL_ZERO_RANGE, which
        # the engine deallocates; BLKDISCARD may drop sub-granularity edges, as discard may.
        self._range_ioctl(BLKDISCARD, lba, block_count)
        self._range_ioctl(BLKZEROOUT, lba, block_count)

    def write_zeroes(self, lba: int, block_count: int) -> None:
        self._range_ioctl(BLKZEROOUT, lba, block_count)

    def flush(self) -> None:
        os.fsync(self._fd)

    def lba_status(self, lba: int) -> LbaStatus:
        self._check(lba, 1)
        off = lba * 512
        end = self.block_count * 512
        try:
            data = os.lseek(self._backing, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            data = end
        if data == off:
            hole = os.lseek(self._backing, off, os.SEEK_HOLE)
            return LbaStatus(lba=lba, block_count=(hole - off) // 512, mapped=True)
        return LbaStatus(lba=lba, block_count=(data - off) // 512, mapped=False)


@dataclass(frozen=True)
class Snapshot:
    loops: frozenset[tuple[str, str]]
    mounts: frozenset[str]
    daemons: frozenset[int]


def daemon_pids(state_root: str | None = None) -> set[int]:
    """Attach daemons (optionally of one state root), found by their command line."""
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"blockyard.attach.daemon" not in argv:
            continue
        if state_root is not None and state_root.encode() not in argv:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
        except OSError:
            continue
        out.add(int(entry))
    return out


def snapshot(root: str) -> Snapshot:
    return Snapshot(
        loops=frozenset((li.device, li.backing_file) for li in loopmod.list_loops()),
        mounts=frozenset(m.mountpoint for m in mounts.read_mounts()),
        daemons=frozenset(daemon_pids(root)),
    )


def losetup_json() -> list[dict[str, object]]:
    out = subprocess.run(
        ["losetup", "-J", "-l"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return list(json.loads(out)["loopdevices"]) if out.strip() else []


def cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "blockyard.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=full_env,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"blockyard {' '.join(args)} failed: {proc.stderr}{proc.stdout}")
    return proc


def kill_and_wait(pids: set[int], timeout_s: float = 10.0) -> None:
    """SIGKILL processes this test started (by pid) and wait until they are gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout_s
    while pids & daemon_pids() and time.monotonic() < deadline:
        time.sleep(0.02)


@dataclass(frozen=True)
class AttachEnv:
    root: str
    data_dir: str
    tmp: Path

    def local(self, name: str) -> str:
        return f"{self.data_dir}/{name}"
