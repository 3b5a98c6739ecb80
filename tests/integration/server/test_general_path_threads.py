"""Where the iSCSI server runs the READs and WRITEs its connections' fast path leaves to the
general path (here WRITE (12) and READ (12), which the fast path never takes): on the event
loop when nothing would wait, exactly like the fast path, and on the thread pool when the
device says it would (a full WAL, data not in the page cache)."""

from __future__ import annotations

import asyncio
import struct
import threading
import uuid

from hostile_helpers import RawSession, login

from blockyard.blockdev import BytesLike
from blockyard.iscsi.login import TargetConfig
from blockyard.iscsi.pdu import DataIn, ScsiCommand, ScsiResponse, encode_pdu
from blockyard.scsi.alua import StaticAlua
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.reservations import MemoryReservationStore
from blockyard.server.iscsi_server import DictTargetRegistry, IscsiServer, ServedTarget
from blockyard.testing.memdev import MemoryBlockDevice

TARGET = "iqn.2026-11.io.blockyard.test:threads"
LOOP_THREAD = "iscsi-server"
WAIT_S = 10.0
BLOCK = 512


class WhereDevice(MemoryBlockDevice):
    """Records the thread of every read and write; its try calls decline while ``declining``."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.declining = False
        self.threads: list[str] = []

    def _note(self) -> None:
        self.threads.append(threading.current_thread().name)

    def try_read(self, lba: int, block_count: int) -> bytes | None:
        if self.declining:
            return None
        self._note()
        return super().read(lba, block_count)

    def try_write(self, lba: int, data: BytesLike) -> int | None:
        if self.declining:
            return None
        self._note()
        super().write(lba, data)
        return 1

    def read(self, lba: int, block_count: int) -> bytes:
        self._note()
        return super().read(lba, block_count)

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        self._note()
        super().write(lba, data, fua=fua)


def _command(
    session: RawSession, cdb: bytes, data: bytes = b"", read_bytes: int = 0, *, ok: bool = True
) -> bytes:
    cmd = ScsiCommand(
        itt=next(session.itts), cdb=cdb.ljust(16, b"\0"), cmd_sn=session.cmd_sn,
        expected_data_transfer_length=len(data) or read_bytes, read=bool(read_bytes),
        write=bool(data), data=data,
    )  # fmt: skip
    session.cmd_sn = (session.cmd_sn + 1) & 0xFFFFFFFF
    session.sock.sendall(encode_pdu(cmd))
    got = b""
    while True:
        pdu = session.next_answer()
        if isinstance(pdu, DataIn):
            got += bytes(pdu.data)
            if pdu.status_present:
                assert pdu.status == 0
                return got
        else:
            assert isinstance(pdu, ScsiResponse) and (pdu.status == 0 or not ok), pdu
            return got


def test_general_path_reads_and_writes_run_on_the_loop_unless_they_would_wait() -> None:
    device = WhereDevice(4096)
    lu = LogicalUnit(
        device, LuIdentity(uuid.uuid4()), StaticAlua.single(), MemoryReservationStore()
    )
    server = IscsiServer(
        DictTargetRegistry([ServedTarget(TargetConfig(TARGET), lu)]), "127.0.0.1", 0
    )
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name=LOOP_THREAD, daemon=True)
    thread.start()
    assert ready.wait(WAIT_S)
    session = login(f"127.0.0.1:{server.port}", TARGET)
    try:
        _command(session, bytes(6), ok=False)  # TEST UNIT READY: takes the power-on unit attention
        write12 = struct.pack(">BBIIBB", 0xAA, 0, 8, 8, 0, 0)
        read12 = struct.pack(">BBIIBB", 0xA8, 0, 8, 8, 0, 0)
        data = bytes(range(256)) * 16
        _command(session, write12, data)
        assert _command(session, read12, read_bytes=len(data)) == data
        assert device.threads == [LOOP_THREAD, LOOP_THREAD]

        device.declining = True
        device.threads.clear()
        _command(session, write12, data[::-1])
        assert _command(session, read12, read_bytes=len(data)) == data[::-1]
        assert len(device.threads) == 2
        assert all(name.startswith("iscsi-io") for name in device.threads), device.threads
    finally:
        session.close()
        asyncio.run_coroutine_threadsafe(server.close(2.0), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()
