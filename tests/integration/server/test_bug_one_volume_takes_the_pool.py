"""Regression: one volume whose commands all wait took every worker of the iSCSI server's
thread pool, and every other volume's flushes (and, once reads and writes that may wait run
there too, its reads and writes) queued behind it.

The pool was shared first come, first served: a volume whose flushes hang (a stalled disk)
with four SYNCHRONIZE CACHE in flight held all four workers. Now one volume runs at most
``volume_workers_max`` commands at once (half the workers) and queues the rest in order, so
another volume's flush is answered at once; the stuck volume's commands all complete, in
order, once its disk comes back.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from hostile_helpers import RawSession, login

from blockyard.iscsi.login import TargetConfig
from blockyard.iscsi.pdu import ScsiCommand, ScsiResponse, encode_pdu
from blockyard.scsi.alua import StaticAlua
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.reservations import MemoryReservationStore
from blockyard.server.iscsi_server import (
    DictTargetRegistry,
    IscsiServer,
    ServedTarget,
    ServerSettings,
)
from blockyard.testing.memdev import MemoryBlockDevice

STUCK = "iqn.2026-11.io.blockyard.test:stuck"
FREE = "iqn.2026-11.io.blockyard.test:free"
WAIT_S = 10.0
#: How long the other volume's flush may take while the stuck one holds its share.
ANSWER_BOUND_S = 2.0
SETTINGS = ServerSettings(flush_workers=4)
SHARE = 2  # the default: half the workers
STUCK_FLUSHES = 8


class StuckDevice(MemoryBlockDevice):
    """A device whose flush waits until released, counting how many wait at once."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.waiting = 0
        self.most_waiting = 0
        self.flushed = 0

    def flush(self) -> None:
        with self._lock:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            assert self.release.wait(WAIT_S * 3), "the test never released the stuck flushes"
        finally:
            with self._lock:
                self.waiting -= 1
                self.flushed += 1


def _lu(device: MemoryBlockDevice) -> LogicalUnit:
    return LogicalUnit(
        device, LuIdentity(uuid.uuid4()), StaticAlua.single(), MemoryReservationStore()
    )


def _send(session: RawSession, cdb: bytes) -> int:
    """Send a non-data command with the next CmdSN; returns its ITT."""
    itt = next(session.itts)
    cmd = ScsiCommand(itt=itt, cdb=cdb.ljust(16, b"\0"), cmd_sn=session.cmd_sn)
    session.cmd_sn = (session.cmd_sn + 1) & 0xFFFFFFFF
    session.sock.sendall(encode_pdu(cmd))
    return itt


def _answer(session: RawSession) -> ScsiResponse:
    pdu = session.next_answer()
    assert isinstance(pdu, ScsiResponse), pdu
    return pdu


def test_a_volume_whose_commands_hang_leaves_workers_to_the_others() -> None:
    stuck = StuckDevice(4096)
    registry = DictTargetRegistry(
        [
            ServedTarget(TargetConfig(STUCK), _lu(stuck)),
            ServedTarget(TargetConfig(FREE), _lu(MemoryBlockDevice(4096))),
        ]
    )
    loop = asyncio.new_event_loop()
    server = IscsiServer(registry, "127.0.0.1", 0, settings=SETTINGS)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="iscsi-server", daemon=True)
    thread.start()
    assert ready.wait(WAIT_S)
    portal = f"127.0.0.1:{server.port}"
    sessions: list[RawSession] = []
    try:
        a = login(portal, STUCK)
        b = login(portal, FREE)
        sessions += [a, b]
        for s in (a, b):
            _send(s, bytes(6))  # TEST UNIT READY: takes the power-on unit attention
            _answer(s)
        sync_cache = bytes([0x35]) + bytes(9)
        stuck_itts = [_send(a, sync_cache) for _ in range(STUCK_FLUSHES)]
        deadline = time.monotonic() + WAIT_S
        while stuck.waiting < SHARE:
            assert time.monotonic() < deadline, "the stuck volume's flushes never started"
            time.sleep(0.01)

        started = time.monotonic()
        _send(b, sync_cache)
        b.sock.settimeout(WAIT_S)
        answer = _answer(b)
        took = time.monotonic() - started
        assert answer.status == 0
        assert took < ANSWER_BOUND_S, f"the free volume's flush waited {took:.1f} s"
        assert stuck.most_waiting == SHARE

        stuck.release.set()
        a.sock.settimeout(WAIT_S)
        done = [_answer(a) for _ in stuck_itts]
        assert sorted(p.itt for p in done) == sorted(stuck_itts)
        assert all(p.status == 0 for p in done)
        assert stuck.flushed == STUCK_FLUSHES
    finally:
        stuck.release.set()
        for s in sessions:
            s.close()
        asyncio.run_coroutine_threadsafe(server.close(2.0), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()
