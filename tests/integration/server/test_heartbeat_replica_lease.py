"""The replica lease with real processes: two ``blockyard serve --master`` servers, a primary
and its replica (best_effort), assigned by an in-test Master servicer that grants **no** lease
at all (a master outage). The primary keeps acknowledging writes on its replica's answers to
its lease probes alone; when the replica stops answering (SIGSTOP: a partition that sends no
RST), the primary's writes and reads get NOT READY / 04h-0Ah within TTL + margin; when it
answers again (SIGCONT), I/O resumes."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from serve_helpers import Serve, launch
from test_heartbeat_lease_fencing import (
    BLOCK,
    STATUS_GOOD,
    command,
    is_transitioning,
    wait_for,
)

from blockyard.attach.initiator import scsi
from blockyard.attach.initiator.connection import InitiatorSettings, IscsiConnection
from blockyard.iscsi.discovery import Portal
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.proto import master_pb2_grpc as mgrpc
from blockyard.replication.lease import DEFAULT_LEASE_TTL_NS, LEASE_MARGIN_NS
from blockyard.server.proto import volume_server_pb2 as vpb

MIB = 1 << 20
EPOCH = 7


class TwoServerMaster(mgrpc.MasterServicer):
    """Assigns replica to the server whose API is ``replica_api`` and primary (with that
    server's replication address as its replica) to the other; grants nothing."""

    def __init__(self, replica_api: str) -> None:
        self.replica_api = replica_api
        self.replication_of: dict[str, str] = {}
        self.api_of: dict[str, str] = {}
        self.vol_uuid = str(uuid.uuid4())
        self.lock = threading.Lock()
        self.reports: dict[str, mpb.VolumeReport] = {}

    def _assignment(self, server_id: str) -> list[mpb.Assignment]:
        base = {"volume": "lv", "uuid": self.vol_uuid, "size_bytes": 4 * MIB, "create": True}
        if self.api_of.get(server_id) == self.replica_api:
            return [mpb.Assignment(role=vpb.ROLE_REPLICA, epoch=EPOCH, **base)]  # type: ignore[arg-type]
        replica = next(
            (self.replication_of[s] for s, a in self.api_of.items() if a == self.replica_api), ""
        )
        if not replica:
            return []
        return [
            mpb.Assignment(
                role=vpb.ROLE_PRIMARY,
                epoch=EPOCH,
                replicas=[replica],
                # best_effort: its plain writes wait for nothing but the lease, so a write
                # issued after the replica froze shows the fence. (In sync_all it would wait
                # for the frozen replica's receipt instead: test_partition_netns.py.)
                mode=vpb.DURABILITY_MODE_BEST_EFFORT,
                **base,  # type: ignore[arg-type]
            )
        ]

    def Heartbeat(
        self, request_iterator: Iterator[mpb.ServerHeartbeat], context: grpc.ServicerContext
    ) -> Iterator[mpb.MasterReply]:
        for hb in request_iterator:
            with self.lock:
                if hb.full:
                    self.api_of[hb.server_id] = hb.addresses.api
                    self.replication_of[hb.server_id] = hb.addresses.replication
                for v in hb.volumes:
                    if v.name == "lv":
                        self.reports[self.api_of.get(hb.server_id, "")] = v
                report = self.reports.get(self.api_of.get(hb.server_id, ""))
                wanted = self._assignment(hb.server_id)
                done = (
                    report is not None
                    and wanted
                    and report.role == wanted[0].role
                    and report.epoch == EPOCH
                    and (
                        wanted[0].role != vpb.ROLE_PRIMARY
                        or [r.address for r in report.replicas] == list(wanted[0].replicas)
                    )
                )
            yield mpb.MasterReply(
                seq=hb.seq, sent_mono_ns=hb.sent_mono_ns, assignments=[] if done else wanted
            )

    def MarkOutOfSync(
        self, request: mpb.MarkOutOfSyncRequest, context: grpc.ServicerContext
    ) -> mpb.MarkOutOfSyncResponse:
        # A primary drops a replica only once the master recorded it (the degrade decision);
        # this master records nothing and agrees.
        return mpb.MarkOutOfSyncResponse()

    def primary_replica_in_sync(self, primary_api: str) -> bool:
        with self.lock:
            report = self.reports.get(primary_api)
            return (
                report is not None
                and report.role == vpb.ROLE_PRIMARY
                and any(r.phase == "in_sync" for r in report.replicas)
            )


def start(tmp_path: Path, name: str, master_port: int) -> Serve:
    serve = launch(
        tmp_path / name,
        tmp_path / "logs",
        extra_args=(
            "--replication-listen",
            "127.0.0.1:0",
            "--master",
            f"127.0.0.1:{master_port}",
            "--heartbeat-interval",
            "100ms",
        ),
    )
    assert serve.api, serve.stderr()
    return serve


def test_replica_answers_keep_the_lease_without_a_master_grant(tmp_path: Path) -> None:
    replica = primary = None
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=4))
    master_port = grpc_server.add_insecure_port("127.0.0.1:0")
    try:
        replica = start(tmp_path, "replica", master_port)
        master = TwoServerMaster(replica.api)
        mgrpc.add_MasterServicer_to_server(master, grpc_server)  # type: ignore[no-untyped-call]
        grpc_server.start()
        primary = start(tmp_path, "primary", master_port)
        wait_for(lambda: master.primary_replica_in_sync(primary.api), "the replica in sync")
        iqn = primary.call(lambda c: c.get_volume("lv")).export.iqn
        host, _, port = primary.iscsi[0].rpartition(":")
        asyncio.run(exercise(Portal(host, int(port)), iqn, replica))
    finally:
        for s in (primary, replica):
            if s is not None:
                if s.process.poll() is None:
                    s.process.send_signal(signal.SIGCONT)
                assert s.stop() == 0, s.stderr()
        grpc_server.stop(0)


async def exercise(portal: Portal, iqn: str, replica: Serve) -> None:
    settings = InitiatorSettings(initiator_name="iqn.2026-11.io.blockyard.test:replica-lease")
    conn = await IscsiConnection.open(portal, settings, target_name=iqn)
    try:
        for _ in range(10):
            if (await command(conn, scsi.test_unit_ready())).status == STATUS_GOOD:
                break
        data = b"\x33" * BLOCK
        ok = None
        for _ in range(250):  # the first probe answers arrive within a probe interval
            ok = await command(conn, scsi.write16(0, 8, fua=True), data_out=data)
            if ok.status == STATUS_GOOD:
                break
            assert is_transitioning(ok), ok
            await asyncio.sleep(0.02)
        assert ok is not None and ok.status == STATUS_GOOD, ok
        # Steady: no master grant ever, still acknowledged for several TTLs.
        until = time.monotonic_ns() + 2 * DEFAULT_LEASE_TTL_NS
        while time.monotonic_ns() < until:
            outcome = await command(conn, scsi.write16(8, 8), data_out=data)
            assert outcome.status == STATUS_GOOD, outcome
            await asyncio.sleep(0.05)

        replica.process.send_signal(signal.SIGSTOP)
        stopped_ns = time.monotonic_ns()
        fenced_ns = 0
        while time.monotonic_ns() < stopped_ns + 3 * DEFAULT_LEASE_TTL_NS:
            outcome = await command(conn, scsi.write16(16, 8), data_out=data)
            if outcome.status != STATUS_GOOD:
                assert is_transitioning(outcome), outcome
                fenced_ns = time.monotonic_ns()
                break
            await asyncio.sleep(0.02)
        assert fenced_ns, "the primary kept acknowledging without any lease"
        assert fenced_ns - stopped_ns <= DEFAULT_LEASE_TTL_NS + LEASE_MARGIN_NS
        print(f"fenced {(fenced_ns - stopped_ns) / 1e6:.0f} ms after the replica stopped")
        read = await command(conn, scsi.read16(0, 8), read_length=BLOCK)
        assert is_transitioning(read), read

        replica.process.send_signal(signal.SIGCONT)
        resumed_ns = 0
        while time.monotonic_ns() < stopped_ns + 30 * DEFAULT_LEASE_TTL_NS:
            outcome = await command(conn, scsi.write16(16, 8), data_out=data)
            if outcome.status == STATUS_GOOD:
                resumed_ns = time.monotonic_ns()
                break
            assert is_transitioning(outcome), outcome
            await asyncio.sleep(0.05)
        assert resumed_ns, "writes did not resume once the replica answered again"
        read = await command(conn, scsi.read16(0, 8), read_length=BLOCK)
        assert read.status == STATUS_GOOD and read.data == data
    finally:
        await conn.logout()
