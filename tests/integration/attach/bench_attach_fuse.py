"""Benchmark: FUSE bindings and the attach path, measured with fio on a real loop device.

Not a test (pytest does not collect it). Run as root::

    .venv/bin/python tests/integration/attach/bench_attach_fuse.py [--seconds 8] [--dir /var/tmp]

Rows, each a loop device with direct I/O on and fio with O_DIRECT + libaio:

- ``kernel``: a loop device on a plain file (no FUSE, no engine): the ceiling of this machine;
- ``mfusepy``: blockyard's SectorFile over an engine volume, served by mfusepy (libfuse3 mt loop);
- ``pyfuse3``: the same SectorFile served by pyfuse3 (trio; device calls in worker threads).
  Skipped when pyfuse3 is not installed (it is not a blockyard dependency).

Results go to stdout as a markdown table for docs/attach.md.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from blockyard.attach.fusefile import SectorFile, serve
from blockyard.engine import VolumeStore

WORKLOADS = (
    ("4k randread qd16", ["--rw=randread", "--bs=4k", "--iodepth=16"]),
    ("4k randwrite qd16", ["--rw=randwrite", "--bs=4k", "--iodepth=16"]),
    ("1M read qd4", ["--rw=read", "--bs=1M", "--iodepth=4"]),
    ("1M write qd4", ["--rw=write", "--bs=1M", "--iodepth=4"]),
)
SIZE_BYTES = 1 << 30
TOOL_TIMEOUT_S = 30.0


def _fio(device: str, args: list[str], seconds: float) -> str:
    out = subprocess.run(
        [
            "fio",
            "--name=bench",
            f"--filename={device}",
            "--ioengine=libaio",
            "--direct=1",
            f"--runtime={seconds}",
            "--time_based",
            "--size=512M",
            "--randrepeat=0",
            "--output-format=json",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    job = json.loads(out)["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    iops = side["iops"]
    mib_s = side["bw_bytes"] / (1 << 20)
    lat_us = side["clat_ns"]["mean"] / 1000
    return f"{iops:,.0f} IOPS, {mib_s:,.0f} MiB/s, {lat_us:,.0f} µs"


@contextmanager
def _loop(path: str) -> Iterator[str]:
    dev = subprocess.run(
        ["losetup", "--direct-io=on", "--find", "--show", path],
        capture_output=True,
        text=True,
        check=True,
        timeout=TOOL_TIMEOUT_S,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=TOOL_TIMEOUT_S)


def _serve(binding: str, data_dir: str, mountpoint: str) -> None:
    """Child process: serve one engine volume through ``binding`` until unmounted."""
    store = VolumeStore(data_dir)
    vol = store.open("bench") if store.exists("bench") else store.create("bench", SIZE_BYTES)
    file = SectorFile(vol, name="bench")
    if binding == "mfusepy":
        serve(file, mountpoint, fsname="bench", on_init=lambda: print("ready", flush=True))
    else:
        _serve_pyfuse3(file, mountpoint)
    vol.close()


def _serve_pyfuse3(file: object, mountpoint: str) -> None:
    # Optional: pyfuse3 is only installed to run this comparison.
    import pyfuse3  # noqa: PLC0415
    import trio  # noqa: PLC0415

    assert isinstance(file, SectorFile)
    ino = pyfuse3.ROOT_INODE + 1

    class Ops(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):
            e = pyfuse3.EntryAttributes()
            if inode == pyfuse3.ROOT_INODE:
                e.st_mode = stat.S_IFDIR | 0o700
            elif inode == ino:
                e.st_mode = stat.S_IFREG | 0o600
                e.st_size = file.size_bytes
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            e.st_ino = inode
            e.st_blksize = 4096
            return e

        async def lookup(self, parent, name, ctx=None):
            if parent != pyfuse3.ROOT_INODE or name != b"disk":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return await self.getattr(ino)

        async def open(self, inode, flags, ctx):
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh, off, size):
            return await trio.to_thread.run_sync(file.read, off, size)

        async def write(self, fh, off, buf):
            return await trio.to_thread.run_sync(file.write, off, buf)

        async def fsync(self, fh, datasync):
            await trio.to_thread.run_sync(file.sync)

        async def flush(self, fh):
            await trio.to_thread.run_sync(file.sync)

        async def release(self, fh):
            return None

    opts = set(pyfuse3.default_options)
    opts.add("fsname=bench")
    pyfuse3.init(Ops(), mountpoint, opts)
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def _bench_fuse(binding: str, root: str, seconds: float) -> dict[str, str]:
    data = os.path.join(root, f"data-{binding}")
    mnt = os.path.join(root, f"mnt-{binding}")
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", binding, "--data", data, "--mnt", mnt],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"{binding} server did not start: {line!r}"
        time.sleep(0.2)
        with _loop(os.path.join(mnt, "disk")) as dev:
            subprocess.run(
                [
                    "dd",
                    f"of={dev}",
                    "if=/dev/urandom",
                    "bs=1M",
                    "count=512",
                    "oflag=direct",
                    "status=none",
                ],
                check=True,
                timeout=300,
            )
            return {name: _fio(dev, args, seconds) for name, args in WORKLOADS}
    finally:
        subprocess.run(["umount", mnt], check=False, timeout=TOOL_TIMEOUT_S)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _bench_kernel(root: str, seconds: float) -> dict[str, str]:
    path = os.path.join(root, "plain.img")
    with open(path, "wb") as f:
        f.truncate(SIZE_BYTES)
    with _loop(path) as dev:
        subprocess.run(
            [
                "dd",
                f"of={dev}",
                "if=/dev/urandom",
                "bs=1M",
                "count=512",
                "oflag=direct",
                "status=none",
            ],
            check=True,
            timeout=300,
        )
        return {name: _fio(dev, args, seconds) for name, args in WORKLOADS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--serve")
    ap.add_argument("--data")
    ap.add_argument("--mnt")
    ap.add_argument("--only", help="comma-separated subset of kernel,mfusepy,pyfuse3")
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, args.data, args.mnt)
        return
    rows = (args.only or "kernel,mfusepy,pyfuse3").split(",")
    root = tempfile.mkdtemp(prefix="blockyard-fusebench-", dir=args.dir)
    results: dict[str, dict[str, str]] = {}
    try:
        for row in rows:
            if row == "kernel":
                results[row] = _bench_kernel(root, args.seconds)
            elif row == "pyfuse3" and not _has("pyfuse3"):
                print("pyfuse3 not installed: skipped", file=sys.stderr)
            else:
                results[row] = _bench_fuse(row, root, args.seconds)
            print(row, results.get(row), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| path | " + " | ".join(name for name, _ in WORKLOADS) + " |")
    print("|---" * (len(WORKLOADS) + 1) + "|")
    for row, res in results.items():
        print(f"| {row} | " + " | ".join(res[name] for name, _ in WORKLOADS) + " |")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
