"""The space policy of `blockyard serve` on a real 64 MiB tmpfs.

Soft threshold: data written through iSCSI (qemu-io) takes the data directory below
``--space-soft-threshold``; the low-space metric turns 1 and an initiator that was logged in
gets THIN PROVISIONING SOFT THRESHOLD REACHED (06/38/07) on the wire, once (blockyard's own
userspace initiator, which hands back the sense data of each command). UNMAP (qemu-io discard)
frees the space: the metric clears, no unit attention; crossing again raises it again.

Disk full: 1 MiB writes with a flush every 4 until the initiator gets SPACE ALLOCATION FAILED
(qemu-io: "No space left on device"; 07/27/07 on the wire). Every acknowledged write reads back
while the disk is full and after space returns; after a SIGKILL and a restart every flushed
write still does (the data loss of issue 12 §1, now through the whole server).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from serve_helpers import Serve, need_tools, qemu_io
from test_serve_metrics import check_ok, metric, wait_metric

from blockyard.attach.initiator import scsi as cdb
from blockyard.attach.initiator.connection import (
    CommandOutcome,
    InitiatorSettings,
    IscsiConnection,
    parse_target_address,
)
from blockyard.attach.initiator.scsi import Sense
from blockyard.scsi.constants import THIN_PROVISIONING_SOFT_THRESHOLD_REACHED, Status
from blockyard.server.space import CHECK_INTERVAL_S
from blockyard.testing.cluster import free_port

T = TypeVar("T")
MIB = 1 << 20
SMALL_FS_BYTES = 64 * MIB
#: Long enough for a space check (every CHECK_INTERVAL_S) after the flusher applied the data.
SPACE_WAIT_S = 6 * CHECK_INTERVAL_S
COMMAND_TIMEOUT_S = 30.0
INITIATOR = "iqn.2024-01.io.blockyard.test:space"
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
SPACE_ALLOCATION_FAILED = (0x27, 0x07)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 64 MiB tmpfs under ``tmp_path``, unmounted afterwards (after the servers the
    test started are stopped: this fixture is set up first)."""
    if os.geteuid() != 0:
        pytest.fail("these tests mount a tmpfs and must run as root (CI does)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs", str(mnt)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=60)


class Initiator:
    """One logged-in session of blockyard's userspace initiator on its own event-loop thread,
    so it stays alive (answering NOP-Ins) while the test does other things."""

    def __init__(self, portal: str, iqn: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        settings = InitiatorSettings(INITIATOR, command_timeout_s=COMMAND_TIMEOUT_S)
        self.conn = self._run(
            IscsiConnection.open(parse_target_address(portal), settings, target_name=iqn)
        )

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(2 * COMMAND_TIMEOUT_S)

    def tur(self) -> CommandOutcome:
        return self._run(self.conn.execute(cdb.test_unit_ready()))

    def write_4k(self, lba: int) -> CommandOutcome:
        return self._run(self.conn.execute(cdb.write16(lba, 8), data_out=b"\xab" * 4096))

    def settle(self) -> None:
        """TEST UNIT READY until GOOD (consumes pending unit attentions, power-on first)."""
        for _ in range(8):
            if self.tur().status == Status.GOOD:
                return
        pytest.fail("TEST UNIT READY never returned GOOD")

    def close(self) -> None:
        try:
            self._run(self.conn.logout())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(COMMAND_TIMEOUT_S)
            self.loop.close()


def sense_of(outcome: CommandOutcome) -> Sense:
    assert outcome.status == Status.CHECK_CONDITION, outcome
    assert outcome.sense is not None
    return outcome.sense


def start_on(tmpfs: Path, start_serve: Callable[..., Serve], *args: str) -> tuple[Serve, int]:
    port = free_port()
    serve = start_serve(tmpfs / "data", extra_args=("--metrics-listen", f"127.0.0.1:{port}", *args))
    assert serve.api, serve.stderr()
    return serve, port


# ---- the soft threshold ------------------------------------------------------------------------


def test_soft_threshold_reaches_initiators_and_rearms(
    tmpfs: Path, start_serve: Callable[..., Serve]
) -> None:
    need_tools("qemu-io")
    # Half of 64 MiB: low below 32 MiB free, re-armed above 32 MiB + 2% of 64 MiB.
    serve, port = start_on(tmpfs, start_serve, "--space-soft-threshold", "50%")
    desc = serve.call(lambda c: c.create_volume("thin", 128 * MIB))  # WAL: 8 MiB, allocated
    url = serve.url("thin")
    assert metric(port, "data_dir_soft_threshold_bytes") == 32 * MIB
    assert metric(port, "data_dir_low_space") == 0
    initiator = Initiator(serve.iscsi[0], desc.export.iqn)
    try:
        initiator.settle()
        for spell in (1, 2):
            # 30 MiB of data: about 26 MiB stay free, below the threshold.
            check_ok(qemu_io(url, "write -P 0x5a 0 30M", "flush"))
            wait_metric(port, "data_dir_low_space", lambda v: v == 1, timeout_s=SPACE_WAIT_S)
            assert metric(port, "data_dir_low_space_events_total") == spell
            sense = sense_of(initiator.tur())
            assert (sense.key, sense.asc_pair) == (
                UNIT_ATTENTION,
                THIN_PROVISIONING_SOFT_THRESHOLD_REACHED,
            )
            assert initiator.tur().status == Status.GOOD  # once, not at every command
            # UNMAP gives the blocks back (holes): the directory recovers, no new attention.
            result = subprocess.run(
                ["qemu-io", "-f", "raw", "--discard=unmap", "-c", "discard 0 30M", url],
                check=False,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
            )
            check_ok(result)
            wait_metric(port, "data_dir_low_space", lambda v: v == 0, timeout_s=SPACE_WAIT_S)
            assert initiator.tur().status == Status.GOOD
    finally:
        initiator.close()
    log = serve.stderr()
    assert log.count("is low on space") == 2, log
    assert log.count("has space again") == 2, log


# ---- disk full ---------------------------------------------------------------------------------

WRITE_MIB = 1
FLUSH_EVERY = 4
#: WAL 6 MiB (size / 16). Once the disk is full the WAL holds up to that much data that still
#: needs new blocks, and applying it is all or nothing: freeing the filler must give back more.
VOLUME_BYTES = 96 * MIB
FILLER_BYTES = 8 * MIB
RECOVER_TIMEOUT_S = 60.0
_WROTE = re.compile(r"wrote \d+/\d+ bytes at offset (\d+)")


def pattern(i: int) -> int:
    return i % 250 + 1


def write_command(i: int) -> str:
    return f"write -P {pattern(i)} {i * WRITE_MIB}M {WRITE_MIB}M"


def fill(url: str) -> tuple[list[int], list[int], str]:
    """Batches of 4 writes and a flush, one qemu-io each, until one fails. Returns the writes
    acknowledged, those covered by a flush that completed, and the failing batch's output."""
    acknowledged: list[int] = []
    flushed: list[int] = []
    for first in range(0, VOLUME_BYTES // MIB, FLUSH_EVERY):
        batch = range(first, first + FLUSH_EVERY)
        result = qemu_io(url, *(write_command(i) for i in batch), "flush")
        out = result.stdout + result.stderr
        acked = sorted(int(m) // MIB for m in _WROTE.findall(out))
        assert set(acked) <= set(batch), out
        acknowledged += acked
        if result.returncode != 0 or "failed" in out:
            return acknowledged, flushed, out
        assert acked == list(batch), out
        flushed += acked
    pytest.fail("the filesystem never filled up: the test's sizes are wrong")


def verify(url: str, writes: list[int]) -> None:
    """Every write in ``writes`` reads back with its own pattern (one qemu-io)."""
    commands = [f"read -P {pattern(i)} {i * WRITE_MIB}M {WRITE_MIB}M" for i in writes]
    result = qemu_io(url, *commands)
    out = result.stdout + result.stderr
    assert "Pattern verification failed" not in out and "failed" not in out, out
    assert out.count("read 1048576/1048576 bytes") == len(writes), out


def test_disk_full_fails_writes_with_space_allocation_failed_and_keeps_flushed_data(
    tmpfs: Path, start_serve: Callable[..., Serve]
) -> None:
    need_tools("qemu-io")
    filler = tmpfs / "filler"
    with open(filler, "wb") as f:
        f.write(os.urandom(FILLER_BYTES))
        f.flush()
        os.fsync(f.fileno())
    serve, port = start_on(tmpfs, start_serve)
    desc = serve.call(lambda c: c.create_volume("full", VOLUME_BYTES))
    url = serve.url("full")

    acknowledged, flushed, out = fill(url)
    assert "No space left on device" in out, out
    assert len(flushed) >= 2 * FLUSH_EVERY, (acknowledged, flushed)
    # The sense on the wire is SPACE ALLOCATION FAILED (SBC-4 §4.7.3.6), not a medium error.
    initiator = Initiator(serve.iscsi[0], desc.export.iqn)
    try:
        initiator.settle()
        sense = sense_of(initiator.write_4k(VOLUME_BYTES // 512 - 8))
        assert (sense.key, sense.asc_pair) == (DATA_PROTECT, SPACE_ALLOCATION_FAILED)
    finally:
        initiator.close()
    wait_metric(port, "data_dir_low_space", lambda v: v == 1, timeout_s=SPACE_WAIT_S)
    # While full, the WAL holds what could not be applied: every acknowledged write reads back.
    verify(url, acknowledged)

    filler.unlink()
    deadline = time.monotonic() + RECOVER_TIMEOUT_S
    extra = acknowledged[-1] + 1
    while True:  # the flusher retries every second; writes succeed once it caught up
        result = qemu_io(url, write_command(extra), "flush")
        if result.returncode == 0 and "failed" not in result.stdout + result.stderr:
            break
        assert time.monotonic() < deadline, result.stdout + result.stderr
        time.sleep(0.5)
    verify(url, [*acknowledged, extra])

    # A crash now: every flushed write is still there after the restart.
    assert serve.stop(signal.SIGKILL) == -signal.SIGKILL
    again, _port = start_on(tmpfs, start_serve)
    verify(again.url("full"), [*flushed, extra])
