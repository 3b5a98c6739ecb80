"""A real ``blockyard serve --master`` against an in-test Master servicer (a test double that
records heartbeats and answers with scripted assignments and leases): the server registers,
becomes primary at the assigned epoch, keeps acknowledging writes while leases come; when the
servicer stops granting, a real initiator's write gets CHECK CONDITION NOT READY / 04h-0Ah
within TTL + margin, and so do reads (the copy may have been deposed: its data may be stale),
while REPORT TARGET PORT GROUPS says TRANSITIONING; when grants resume, I/O succeeds again."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from serve_helpers import Serve, launch

from blockyard.attach.initiator import scsi
from blockyard.attach.initiator.connection import (
    CommandOutcome,
    InitiatorSettings,
    IscsiConnection,
)
from blockyard.iscsi.discovery import Portal
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.proto import master_pb2_grpc as mgrpc
from blockyard.netports import free_port
from blockyard.replication.lease import LEASE_MARGIN_NS
from blockyard.server.proto import volume_server_pb2 as vpb

MIB = 1 << 20
TTL_MS = 1000
EPOCH = 5
WAIT_S = 30.0
STATUS_GOOD = 0
STATUS_CHECK_CONDITION = 2
NOT_READY = 0x02
ASYMMETRIC_ACCESS_STATE_TRANSITION = (0x04, 0x0A)
BLOCK = 4096


class ScriptedMaster(mgrpc.MasterServicer):
    """Sync gRPC servicer: answers each heartbeat with the current script."""

    def __init__(self, assignment: mpb.Assignment) -> None:
        self.assignment = assignment
        self.granting = True
        self.lock = threading.Lock()
        self.heartbeats: list[mpb.ServerHeartbeat] = []
        #: When (this process's monotonic clock, ns) each granting reply was made.
        self.granted_sent_ns: list[int] = []

    def Heartbeat(
        self, request_iterator: Iterator[mpb.ServerHeartbeat], context: grpc.ServicerContext
    ) -> Iterator[mpb.MasterReply]:
        for hb in request_iterator:
            with self.lock:
                self.heartbeats.append(hb)
                leases = []
                if self.granting:
                    leases = [mpb.Lease(volume="lv", epoch=EPOCH, ttl_ms=TTL_MS)]
                    self.granted_sent_ns.append(time.monotonic_ns())
                done = any(
                    v.name == "lv" and v.role == vpb.ROLE_PRIMARY and v.epoch == EPOCH
                    for h in self.heartbeats
                    for v in h.volumes
                )
            yield mpb.MasterReply(
                seq=hb.seq,
                sent_mono_ns=hb.sent_mono_ns,
                leases=leases,
                assignments=[] if done else [self.assignment],
                master_id="scripted",
            )

    def primary_reported(self) -> bool:
        with self.lock:
            return any(
                v.name == "lv" and v.role == vpb.ROLE_PRIMARY and v.epoch == EPOCH
                for h in self.heartbeats
                for v in h.volumes
            )


def wait_for(predicate: object, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


async def command(conn: IscsiConnection, cdb: bytes, **kwargs: object) -> CommandOutcome:
    return await conn.execute(cdb, timeout_s=10.0, **kwargs)  # type: ignore[arg-type]


def is_transitioning(outcome: CommandOutcome) -> bool:
    return (
        outcome.status == STATUS_CHECK_CONDITION
        and outcome.sense is not None
        and outcome.sense.key == NOT_READY
        and outcome.sense.asc_pair == ASYMMETRIC_ACCESS_STATE_TRANSITION
    )


def test_lapsed_lease_fences_writes_and_reads(tmp_path: Path) -> None:
    unused_replica = f"127.0.0.1:{free_port()}"  # nobody answers: only grants keep the lease
    master = ScriptedMaster(
        mpb.Assignment(
            volume="lv",
            uuid=str(uuid.uuid4()),
            size_bytes=4 * MIB,
            role=vpb.ROLE_PRIMARY,
            epoch=EPOCH,
            replicas=[unused_replica],
            mode=vpb.DURABILITY_MODE_BEST_EFFORT,
            create=True,
        )
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    mgrpc.add_MasterServicer_to_server(master, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    serve: Serve | None = None
    try:
        serve = launch(
            tmp_path / "data",
            tmp_path / "logs",
            extra_args=(
                "--replication-listen",
                "127.0.0.1:0",
                "--master",
                f"127.0.0.1:{port}",
                "--heartbeat-interval",
                "100ms",
            ),
        )
        assert serve.api, serve.stderr()
        wait_for(master.primary_reported, "the server to report the assignment applied")
        iqn = serve.call(lambda c: c.get_volume("lv")).export.iqn
        host, _, iscsi_port = serve.iscsi[0].rpartition(":")
        asyncio.run(exercise(master, Portal(host, int(iscsi_port)), iqn))
        assert master.heartbeats[0].full
    finally:
        if serve is not None:
            assert serve.stop() == 0, serve.stderr()
            # SIGTERM told the master first.
            wait_for(lambda: master.heartbeats[-1].stopping, "the stopping heartbeat")
        server.stop(0)


async def exercise(master: ScriptedMaster, portal: Portal, iqn: str) -> None:
    settings = InitiatorSettings(initiator_name="iqn.2026-11.io.blockyard.test:lease")
    conn = await IscsiConnection.open(portal, settings, target_name=iqn)
    try:
        for _ in range(10):  # power-on and ALUA unit attentions
            if (await command(conn, scsi.test_unit_ready())).status == STATUS_GOOD:
                break
        data = b"\x5a" * BLOCK
        # Under leases: writes and flushes succeed.
        ok = await command(conn, scsi.write16(0, 8), data_out=data)
        assert ok.status == STATUS_GOOD, ok
        assert (await command(conn, scsi.synchronize_cache16())).status == STATUS_GOOD

        with master.lock:
            master.granting = False
            last_grant_ns = master.granted_sent_ns[-1]
        # The last grant ran from a heartbeat sent before it arrived here: by TTL + margin
        # after that arrival, writes must be refused (the sense, not silence).
        deadline_ns = last_grant_ns + TTL_MS * 1_000_000 + LEASE_MARGIN_NS
        fenced_at_ns = 0
        while time.monotonic_ns() < deadline_ns + 5 * 1_000_000_000:
            outcome = await command(conn, scsi.write16(8, 8), data_out=b"\x11" * BLOCK)
            if outcome.status != STATUS_GOOD:
                assert is_transitioning(outcome), outcome
                fenced_at_ns = time.monotonic_ns()
                break
            await asyncio.sleep(0.02)
        assert fenced_at_ns, "writes were never fenced"
        assert fenced_at_ns <= deadline_ns, (fenced_at_ns - last_grant_ns) / 1e9
        print(f"fenced {(fenced_at_ns - last_grant_ns) / 1e6:.0f} ms after the last grant")
        # Every command that moves data is fenced, reads included.
        for cdb, out in (
            (scsi.write16(0, 8, fua=True), data),
            (scsi.synchronize_cache16(), None),
            (scsi.write_same16(0, 8, unmap=True), bytes(512)),
        ):
            outcome = await command(conn, cdb, data_out=out)
            assert is_transitioning(outcome), (cdb.hex(), outcome)
        read = await command(conn, scsi.read16(0, 8), read_length=BLOCK)
        assert is_transitioning(read), read

        with master.lock:
            master.granting = True
        resumed = False
        for _ in range(250):
            outcome = await command(conn, scsi.write16(8, 8), data_out=b"\x22" * BLOCK)
            if outcome.status == STATUS_GOOD:
                resumed = True
                break
            assert is_transitioning(outcome), outcome
            await asyncio.sleep(0.02)
        assert resumed, "writes did not resume under renewed grants"
        assert (await command(conn, scsi.synchronize_cache16())).status == STATUS_GOOD
        read = await command(conn, scsi.read16(8, 8), read_length=BLOCK)
        assert read.data == b"\x22" * BLOCK
        read = await command(conn, scsi.read16(0, 8), read_length=BLOCK)
        assert read.status == STATUS_GOOD and read.data == data
    finally:
        await conn.logout()
