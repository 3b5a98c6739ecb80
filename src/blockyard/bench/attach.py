"""``blockyard bench attach``: the node's view of a volume, measured three ways in one run.

1. fio (libaio, O_DIRECT) on ``/dev/loopN`` attached through the whole userspace path:
   `blockyard serve` → iSCSI over loopback → blockyard's initiator → FUSE → loop device;
2. the same fio on a plain file on the same filesystem (what the disk and kernel can do);
3. qemu-img bench over ``iscsi://`` to the same served volume (the network path without FUSE
   and loop; qemu-img bench is sequential, so it runs the sequential rows only).

Ratios: attached/raw and attached/qemu-iscsi.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

from blockyard.bench.iscsi import BenchError, _need, _qemu_bench, _run, blockyard_target

FIO_WORKLOADS: tuple[tuple[str, str, list[str]], ...] = (
    ("4 KiB random read, QD16", "read", ["--rw=randread", "--bs=4k", "--iodepth=16"]),
    ("4 KiB random write, QD16", "write", ["--rw=randwrite", "--bs=4k", "--iodepth=16"]),
    ("1 MiB sequential read, QD4", "read", ["--rw=read", "--bs=1M", "--iodepth=4"]),
    ("1 MiB sequential write, QD4", "write", ["--rw=write", "--bs=1M", "--iodepth=4"]),
)
#: qemu-img bench rows: (workload name above, request size, depth, write?)
QEMU_ROWS = {
    "1 MiB sequential read, QD4": (1 << 20, 4, False),
    "1 MiB sequential write, QD4": (1 << 20, 4, True),
}
FIO_SPAN = "512M"
#: Bytes each qemu-img bench row moves.
QEMU_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    attached: float
    raw: float
    qemu: float | None
    unit: str


def _fio(target: str, args: list[str], kind: str, seconds: int) -> tuple[float, float]:
    """(IOPS, MB/s) of one fio job."""
    out = _run(
        [
            "fio",
            "--name=bench",
            f"--filename={target}",
            "--ioengine=libaio",
            "--direct=1",
            f"--runtime={seconds}",
            "--time_based",
            f"--size={FIO_SPAN}",
            "--randrepeat=0",
            "--output-format=json",
            *args,
        ],
        seconds + 120,
    )
    job = json.loads(out[out.index("{") :])["jobs"][0][kind]
    return float(job["iops"]), float(job["bw_bytes"]) / 1e6


def _cli(*args: str) -> str:
    return _run([sys.executable, "-m", "blockyard.cli.main", *args], 120)


def run_attach_bench(directory: str | None, *, size_bytes: int, seconds: int) -> str:
    _need("fio", "qemu-img")
    own = directory is None
    path = tempfile.mkdtemp(prefix="blockyard-bench-attach-", dir="/var/tmp") if own else directory
    assert path is not None
    os.makedirs(path, exist_ok=True)
    state = os.path.join(path, "attach-state")
    rows: list[Row] = []
    try:
        raw = os.path.join(path, "raw.img")
        with open(raw, "wb") as f:
            f.truncate(size_bytes)
        raw_figures = {name: _fio(raw, args, kind, seconds) for name, kind, args in FIO_WORKLOADS}
        with blockyard_target(path, size_bytes) as target:
            device = _cli(
                "attach", "bench", "--server", target.api, "--block", "--state-dir", state
            )
            device = device.splitlines()[0].strip()
            if not device.startswith("/dev/"):
                raise BenchError(f"attach printed no device: {device!r}")
            try:
                attached = {
                    name: _fio(device, args, kind, seconds) for name, kind, args in FIO_WORKLOADS
                }
            finally:
                _cli("detach", device, "--state-dir", state)
            qemu = {
                name: _qemu_bench(
                    target.url, depth=depth, size=size, count=QEMU_BYTES // size, write=write
                )
                for name, (size, depth, write) in QEMU_ROWS.items()
            }
        for name, _kind, _args in FIO_WORKLOADS:
            sequential = name.startswith("1 MiB")
            pick = 1 if sequential else 0
            q = qemu.get(name)
            rows.append(
                Row(
                    name,
                    attached[name][pick],
                    raw_figures[name][pick],
                    # qemu-img bench reports requests/s; these rows move 1 MiB per request.
                    (q * (1 << 20) / 1e6 if q is not None else None),
                    "MB/s" if sequential else "IOPS",
                )
            )
    finally:
        if own:
            shutil.rmtree(path, ignore_errors=True)
    lines = [
        f"blockyard bench attach — {size_bytes >> 20} MiB volume, fio libaio O_DIRECT over "
        f"{FIO_SPAN}, {seconds} s per job, {os.cpu_count()} CPUs; all rows in this run",
        f"{'workload':<30} {'unit':>5} {'attached':>10} {'raw file':>10} {'ratio':>6} "
        f"{'qemu iscsi':>11} {'ratio':>6}",
    ]
    for r in rows:
        peer = f"{r.qemu:>11,.0f} {r.attached / r.qemu:>5.2f}x" if r.qemu else f"{'-':>11} {'-':>6}"
        lines.append(
            f"{r.name:<30} {r.unit:>5} {r.attached:>10,.0f} {r.raw:>10,.0f} "
            f"{r.attached / r.raw:>5.2f}x {peer}"
        )
    lines.append(
        "attached = serve -> iSCSI (loopback) -> userspace initiator -> FUSE -> /dev/loopN; "
        "qemu iscsi = qemu-img bench over iscsi:// (sequential rows only)"
    )
    return "\n".join(lines)
