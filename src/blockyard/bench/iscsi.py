"""``blockyard bench iscsi``: blockyard's iSCSI target against tgtd, same machine, same run.

Both targets serve a volume of the same size from the same filesystem — blockyard an engine
volume, tgtd a sparse file (its rdwr backing store) — both are prefilled with the same
sequential writes, and the same initiators (libiscsi's iscsi-perf, qemu-img bench) drive them
over loopback. The ratio blockyard/tgtd is printed for each workload.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from blockyard.engine import VolumeStore
from blockyard.errors import BlockyardError
from blockyard.netports import free_port
from blockyard.server.manager import DEFAULT_IQN_PREFIX, volume_iqn

IQN_PREFIX = DEFAULT_IQN_PREFIX
START_TIMEOUT_S = 30.0
TOOL_TIMEOUT_EXTRA_S = 60.0
#: tgtd's management socket number; 0 would be a system daemon's.
TGTD_CONTROL = "29"


class BenchError(BlockyardError):
    """A peer or a tool could not run; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    unit: str
    argv: tuple[str, ...]  # "{url}" is substituted


@dataclass(frozen=True, slots=True)
class Figure:
    workload: str
    unit: str
    blockyard: float
    tgtd: float

    @property
    def ratio(self) -> float:
        return self.blockyard / self.tgtd if self.tgtd else 0.0


def _free_port() -> int:
    return free_port("127.0.0.1")


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"{', '.join(missing)} not found: run scripts/setup.sh (installs libiscsi-bin, "
            "qemu-utils, qemu-block-extra and tgt)"
        )


def _run(argv: list[str], timeout_s: float) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} did not finish within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-500:]}")
    return proc.stdout


def _stop(proc: subprocess.Popen[str], *, hard: bool = False) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@dataclass(frozen=True, slots=True)
class ServedVolume:
    url: str
    api: str


@contextmanager
def blockyard_target(directory: str, size_bytes: int) -> Iterator[ServedVolume]:
    """``blockyard serve`` on a fresh engine volume ``bench``; yields its URL and API address."""
    data_dir = os.path.join(directory, "blockyard")
    store = VolumeStore(data_dir)
    volume = store.create("bench", size_bytes)
    # The server names the target after the volume instance (name and UUID).
    iqn = volume_iqn(IQN_PREFIX, volume.name, volume.uuid)
    volume.close()
    port, api_port = _free_port(), _free_port()
    argv = [
        sys.executable,
        "-m",
        "blockyard.cli.main",
        "serve",
        "--data-dir",
        data_dir,
        "--iscsi-listen",
        f"127.0.0.1:{port}",
        "--api-listen",
        f"127.0.0.1:{api_port}",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise BenchError("blockyard serve exited before it was ready")
            if line.startswith("READY"):
                break
        else:
            raise BenchError(f"blockyard serve was not ready within {START_TIMEOUT_S} s")
        yield ServedVolume(f"iscsi://127.0.0.1:{port}/{iqn}/0", f"127.0.0.1:{api_port}")
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def tgtd_target(directory: str, size_bytes: int) -> Iterator[str]:
    """tgtd serving a sparse file of the same size; yields its iscsi:// URL (LUN 1)."""
    backing = os.path.join(directory, "tgtd.img")
    with open(backing, "wb") as f:
        f.truncate(size_bytes)
    port = _free_port()
    proc = subprocess.Popen(
        ["tgtd", "-f", "-C", TGTD_CONTROL, "--iscsi", f"portal=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    tgtadm = ["tgtadm", "-C", TGTD_CONTROL, "--lld", "iscsi"]
    iqn = "iqn.2026-11.io.tgt:bench"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            probe = subprocess.run(
                [*tgtadm, "--op", "show", "--mode", "target"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise BenchError("tgtd did not start (is another tgtd using its socket?)")
            time.sleep(0.1)
        for step in (
            ["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn],
            ["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", backing],
            ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
        ):
            _run([*tgtadm, *step], 30)
        yield f"iscsi://127.0.0.1:{port}/{iqn}/1"
    finally:
        # tgtd ignores SIGTERM while targets are configured; nothing of it needs to survive.
        _stop(proc, hard=True)


_IOPS_AVERAGE = re.compile(r"iops average (\d+)")
_QEMU_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")


def _iscsi_perf(url: str, queue: int, blocks: int, seconds: int, *, random: bool) -> float:
    argv = ["iscsi-perf", "-m", str(queue), "-b", str(blocks), "-t", str(seconds)]
    if random:
        argv.append("-r")
    out = _run([*argv, url], seconds + TOOL_TIMEOUT_EXTRA_S)
    found = _IOPS_AVERAGE.findall(out)
    if not found:
        raise BenchError(f"could not read iscsi-perf's result: {out[-300:]}")
    return float(found[-1])


def _qemu_bench(url: str, *, depth: int, size: int, count: int, write: bool) -> float:
    argv = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-d", str(depth)]
    argv += ["-s", str(size), "-c", str(count)]
    if write:
        argv.append("-w")
    out = _run([*argv, url], 600)
    m = _QEMU_DONE.search(out)
    if m is None:
        raise BenchError(f"could not read qemu-img bench's result: {out[-300:]}")
    return count / float(m.group(1))


def _prefill(url: str, size_bytes: int) -> None:
    chunk = 1 << 20
    _qemu_bench(url, depth=8, size=chunk, count=size_bytes // chunk, write=True)


def _measure(url: str, size_bytes: int, seconds: int, writes: int) -> dict[str, float]:
    _prefill(url, size_bytes)
    return {
        "4 KiB random read, QD32 (iscsi-perf -m 32 -b 8 -r)": _iscsi_perf(
            url, 32, 8, seconds, random=True
        ),
        "128 KiB sequential read, QD8 (iscsi-perf -m 8 -b 256)": _iscsi_perf(
            url, 8, 256, seconds, random=False
        ),
        "4 KiB write, QD32 (qemu-img bench -w -d 32 -s 4096 -t none)": _qemu_bench(
            url, depth=32, size=4096, count=writes, write=True
        ),
    }


def run_iscsi_bench(directory: str | None, *, size_bytes: int, seconds: int, writes: int) -> str:
    _need("iscsi-perf", "qemu-img", "tgtd", "tgtadm")
    own = directory is None
    path = tempfile.mkdtemp(prefix="blockyard-bench-iscsi-", dir="/var/tmp") if own else directory
    assert path is not None
    os.makedirs(path, exist_ok=True)
    try:
        with blockyard_target(path, size_bytes) as served:
            ours = _measure(served.url, size_bytes, seconds, writes)
        with tgtd_target(path, size_bytes) as url:
            peer = _measure(url, size_bytes, seconds, writes)
    finally:
        if own:
            shutil.rmtree(path, ignore_errors=True)
    figures = [Figure(name, "IOPS", ours[name], peer[name]) for name in ours]
    lines = [
        f"blockyard bench iscsi — {size_bytes >> 20} MiB volume, loopback, "
        f"{os.cpu_count()} CPUs; blockyard and tgtd measured in this run",
        f"{'workload':<62} {'blockyard':>10} {'tgtd':>10} {'ratio':>7}",
    ]
    for f in figures:
        verdict = "ok" if f.ratio >= 1.0 else "below 1.0x"
        lines.append(
            f"{f.workload:<62} {f.blockyard:>10,.0f} {f.tgtd:>10,.0f} {f.ratio:>6.2f}x  {verdict}"
        )
    return "\n".join(lines)
