"""The volume server's event loop never waits on storage.

One `blockyard serve` process, two volumes. ``flooded`` has a snapshot, so before the flusher
overwrites a block it copies the old one into the snapshot's delta file and syncs it; and it
lives on a stalling disk: a FUSE passthrough (slowfs.py) mounted over its directory sleeps in
every write (20 ms) and fsync (1 s) of that delta file. qemu-img floods it with 64 KiB writes
at depth 16: the flusher crawls, its WAL fills and stays full, and every write waits for space.
Meanwhile the test reads 4 KiB blocks of ``steady`` (on the plain data directory) one at a time
and calls the management API (Health, GetVolume), and measures how long each takes.

What broke: plain READ/WRITE ran inline on the event loop, so every write to ``flooded`` held
the loop while it waited for WAL space (up to 30 s): ``steady``'s reads and every API call of
the server stalled with it. Now the loop runs a write only when it cannot wait (the WAL has
room, no writer holds the lock, no append of the volume was slow lately), a read only when the
page cache holds it, and everything else on the bounded thread pool, where one volume can hold
at most half the workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from hostile_helpers import RawSession, login
from serve_helpers import Serve, need_tools

from blockyard.iscsi.pdu import DataIn, ScsiCommand, ScsiResponse, encode_pdu
from blockyard.server.client import VolumeServerClient
from blockyard.testing.cluster import free_port

MIB = 1 << 20
#: The flooded volume: small, so its WAL is the 1 MiB minimum and fills at once.
FLOODED_BYTES = 16 * MIB
STEADY_BYTES = 64 * MIB
#: Region of ``steady`` written before the flood and read during it.
READ_REGION_BYTES = 8 * MIB
READ_BYTES = 4096
#: The stall of the flooded volume's disk: every write and fsync of its snapshot delta file.
STALLED_FILE = ".cow"
WRITE_DELAY_S = 0.02
FSYNC_DELAY_S = 1.0
#: Longest the flood may take to fill the flooded volume's WAL.
FILL_TIMEOUT_S = 30.0
MEASURE_S = 5.0
WAL_BYTES = 1 * MIB
#: The WAL counts as full above this fraction: no room left for another record of the size
#: the flood's merged writes make (up to a quarter of this 1 MiB WAL, plus its header).
FULL_FRACTION = 0.7
#: The bounds this test holds the server to. A read slower than STALL_S counts as stalled;
#: the old code stalled reads for seconds at a time (while the loop waited for WAL space).
READ_P99_MAX_S = 0.05
STALL_S = 0.05
STALLED_MAX_S = 0.5
API_P99_MAX_S = 0.25
#: Reads and API calls there must be at least this many of, or the measurement means nothing.
READS_MIN = 200
API_CALLS_MIN = 20
MOUNT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 20.0


def _need_fuse() -> None:
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        message = "needs FUSE (/dev/fuse and fusermount3 from the fuse3 package)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("inf")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _wal_used_bytes(metrics_port: int, volume: str) -> float | None:
    """``blockyard_server_volume_wal_used_bytes`` of ``volume`` from the metrics endpoint."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    want = f'blockyard_server_volume_wal_used_bytes{{volume="{volume}"}}'
    for line in text.splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return None


def _write10(session: RawSession, lba: int, data: bytes) -> bytes:
    cdb = (
        bytes([0x2A, 0])
        + lba.to_bytes(4, "big")
        + bytes([0])
        + (len(data) // 512).to_bytes(2, "big")
        + bytes(7)
    )
    cmd = ScsiCommand(
        itt=next(session.itts),
        cdb=cdb,
        expected_data_transfer_length=len(data),
        cmd_sn=session.cmd_sn,
        write=True,
        data=data,
    )
    session.cmd_sn = (session.cmd_sn + 1) & 0xFFFFFFFF
    return encode_pdu(cmd)


def _command(session: RawSession, pdu: bytes) -> object:
    """Send one command and return its final answer (a DataIn with status or a response)."""
    session.sock.sendall(pdu)
    while True:
        answer = session.next_answer()
        assert answer is not None, "the server closed the connection"
        if isinstance(answer, ScsiResponse) or (
            isinstance(answer, DataIn) and answer.status_present
        ):
            return answer


def _next_cmd_sn(session: RawSession) -> int:
    cmd_sn = session.cmd_sn
    session.cmd_sn = (cmd_sn + 1) & 0xFFFFFFFF
    return cmd_sn


def _clear_unit_attention(session: RawSession) -> None:
    tur = ScsiCommand(itt=next(session.itts), cdb=bytes(16), cmd_sn=_next_cmd_sn(session))
    _command(session, encode_pdu(tur))  # answered with the POWER ON unit attention


def _prefill(session: RawSession) -> None:
    """Write ``steady``'s read region (real data, not holes)."""
    _clear_unit_attention(session)
    chunk = 64 * 1024
    for offset in range(0, READ_REGION_BYTES, chunk):
        answer = _command(session, _write10(session, offset // 512, os.urandom(chunk)))
        assert isinstance(answer, ScsiResponse) and answer.status == 0, answer


def _sample_wal(port: int, stop: threading.Event, samples: list[float]) -> None:
    while not stop.wait(0.2):
        samples.append(_wal_used_bytes(port, "flooded") or 0.0)


def _timed_reads(session: RawSession, until: float, latencies: list[float]) -> None:
    rng = random.Random(7)
    blocks = READ_REGION_BYTES // READ_BYTES
    while time.monotonic() < until:
        lba = rng.randrange(blocks) * (READ_BYTES // 512)
        pdu = session.read10_bytes(lba, READ_BYTES // 512)
        started = time.monotonic()
        answer = _command(session, pdu)
        latencies.append(time.monotonic() - started)
        assert isinstance(answer, DataIn) and answer.status == 0, answer


def _timed_api_calls(api: str, until: float, latencies: list[float]) -> None:
    async def main() -> None:
        async with VolumeServerClient(api, timeout_s=60, slow_timeout_s=60) as client:
            while time.monotonic() < until:
                for call in (client.health, lambda: client.get_volume("steady")):
                    started = time.monotonic()
                    await call()
                    latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.05)

    asyncio.run(main())


def _mount_slowfs(
    backing: Path, mountpoint: Path, control: Path, log: Path
) -> subprocess.Popen[bytes]:
    helper = Path(__file__).with_name("slowfs.py")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(helper), str(backing), str(mountpoint), str(control)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
            raise AssertionError(f"slowfs did not mount {mountpoint}: {log.read_text()}")
        time.sleep(0.05)
    return proc


def _unmount(mountpoint: Path, proc: subprocess.Popen[bytes]) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False, timeout=30)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def test_a_flooded_volume_on_a_stalling_disk_does_not_stall_the_others(
    tmp_path: Path, start_serve: Callable[..., Serve]
) -> None:
    need_tools("qemu-img")
    _need_fuse()
    data = tmp_path / "data"
    metrics_port = free_port()
    extra = ("--metrics-listen", f"127.0.0.1:{metrics_port}")

    # Both volumes are made on the plain directory; then the flooded one's directory moves
    # onto the stalling filesystem, mounted where it was.
    serve = start_serve(data, extra_args=extra)
    assert serve.api, serve.stderr()
    serve.call(lambda c: c.create_volume("flooded", FLOODED_BYTES))
    serve.call(lambda c: c.create_snapshot("flooded", "before"))
    serve.call(lambda c: c.create_volume("steady", STEADY_BYTES))
    assert serve.stop() == 0, serve.stderr()
    backing = tmp_path / "slow-backing"
    shutil.move(data / "flooded", backing)
    (data / "flooded").mkdir()
    control = tmp_path / "slowfs.json"
    control.write_text(json.dumps({}))
    fuse = _mount_slowfs(backing, data / "flooded", control, tmp_path / "slowfs.log")
    stall = {"match": STALLED_FILE, "write_delay_s": WRITE_DELAY_S, "fsync_delay_s": FSYNC_DELAY_S}
    flood: subprocess.Popen[str] | None = None
    steady: RawSession | None = None
    stop = threading.Event()
    wal_samples: list[float] = []
    read_latencies: list[float] = []
    api_latencies: list[float] = []
    try:
        serve = start_serve(data, extra_args=extra)
        assert serve.api, serve.stderr()
        steady = login(serve.iscsi[0], serve.call(lambda c: c.get_volume("steady")).export.iqn)
        _prefill(steady)
        warm: list[float] = []
        _timed_reads(steady, time.monotonic() + 1.0, warm)  # the page cache holds the region

        control.write_text(json.dumps(stall))
        flood = subprocess.Popen(
            ["qemu-img", "bench", "-f", "raw", "-t", "none", "-w", "-d", "16", "-s", "65536",
             "-c", "10000000", serve.url("flooded")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + FILL_TIMEOUT_S
        while (_wal_used_bytes(metrics_port, "flooded") or 0.0) < FULL_FRACTION * WAL_BYTES:
            assert time.monotonic() < deadline, "the flood never filled the WAL"
            assert flood.poll() is None, flood.stderr.read() if flood.stderr else ""
            time.sleep(0.1)

        until = time.monotonic() + MEASURE_S
        sampler = threading.Thread(
            target=_sample_wal, args=(metrics_port, stop, wal_samples), daemon=True
        )
        sampler.start()
        api = threading.Thread(
            target=_timed_api_calls, args=(serve.api, until, api_latencies), daemon=True
        )
        api.start()
        _timed_reads(steady, until, read_latencies)
        api.join(timeout=STOP_TIMEOUT_S + MEASURE_S)
        assert flood.poll() is None, "the flood ended before the measurement did"
    finally:
        stop.set()
        if steady is not None:
            steady.close()
        if flood is not None:
            if flood.poll() is None:
                flood.send_signal(signal.SIGKILL)
            flood.wait(timeout=STOP_TIMEOUT_S)
            assert flood.stderr is not None
            flood.stderr.close()
        control.write_text(json.dumps({}))
        serve.stop()
        _unmount(data / "flooded", fuse)

    read_p99 = _percentile(read_latencies, 0.99)
    stalled_s = sum(t for t in read_latencies if t > STALL_S)
    api_p99 = _percentile(api_latencies, 0.99)
    full = sum(x >= FULL_FRACTION * WAL_BYTES for x in wal_samples)
    summary = (
        f"steady reads: {len(read_latencies)}, p99 {read_p99 * 1e3:.1f} ms, "
        f"max {_percentile(read_latencies, 1) * 1e3:.0f} ms, {stalled_s:.2f} s in reads over "
        f"{STALL_S * 1e3:.0f} ms; API calls: {len(api_latencies)}, p99 {api_p99 * 1e3:.1f} ms, "
        f"max {_percentile(api_latencies, 1) * 1e3:.0f} ms; flooded WAL full in {full} of "
        f"{len(wal_samples)} samples"
    )
    print(summary)
    assert not api.is_alive(), f"the management API calls did not finish: {summary}"
    # The flood really stalled the flooded volume: its WAL stayed full most of the time.
    assert wal_samples and full >= len(wal_samples) / 2, summary
    assert len(read_latencies) >= READS_MIN, summary
    assert len(api_latencies) >= API_CALLS_MIN, summary
    assert read_p99 < READ_P99_MAX_S, summary
    assert stalled_s < STALLED_MAX_S, summary
    assert api_p99 < API_P99_MAX_S, summary
