"""The volume server's heartbeat client (``blockyard serve --master HOST:PORT[,HOST:PORT]``).

One bidirectional ``blockyard.v1.Master/Heartbeat`` stream to the master. The first message of
a stream is full (identity, addresses, zone, capacity, every volume); later ones, every
``--heartbeat-interval`` (default 500 ms, or what the master's replies ask for), carry the
volumes whose report changed, plus ``sent_mono_ns`` (this server's CLOCK_MONOTONIC at send)
and ``seq``.

Each reply:

- **leases**: a grant for (volume, epoch) runs from the send time *this server recorded* for
  the heartbeat the reply answers (by ``seq``; an unknown ``seq`` grants nothing), so the
  server's lease never outlives the master's view (see :mod:`blockyard.replication.lease`);
- **assignments**, re-sent by the master until the server reports the matching (volume,
  epoch, role): create the copy (with the given UUID and size), role + epoch + replica set +
  durability mode through the manager's ``SetReplication`` path, grow, or delete. They are
  applied in the background, at most one per volume at a time and :data:`MAX_APPLYING` in all,
  so that a slow create never holds up the leases of the next replies; the resulting state goes
  out in the next heartbeat, which is what confirms them.

A broken stream is re-opened with bounded backoff on the next master address (or straight on
the leader a FAILED_PRECONDITION names, in its ``blockyard-leader`` trailing metadata), with a
full heartbeat again. :meth:`HeartbeatClient.stop` (SIGTERM) sends ``stopping=true`` first, so
the master grants this server nothing more. Storage work (capacity, allocated bytes) runs on
the manager's pool; nothing here waits on storage on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import grpc

from blockyard import aio, tls
from blockyard.engine.epoch import Role
from blockyard.engine.volume import Volume
from blockyard.errors import BlockyardError
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.proto import master_pb2_grpc as mgrpc
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.primary import ReplicatedDevice
from blockyard.server.convert import MODE_FROM_PB, MODE_TO_PB, ROLE_FROM_PB, ROLE_TO_PB
from blockyard.server.degrade import MasterMarker
from blockyard.server.manager import volume_iqn

if TYPE_CHECKING:
    from blockyard.server.manager import VolumeManager

log = logging.getLogger("blockyard.server.heartbeat")

DEFAULT_HEARTBEAT_INTERVAL_S: Final = 0.5
#: Bounds on the interval a master may ask for.
MIN_HEARTBEAT_INTERVAL_S: Final = 0.05
MAX_HEARTBEAT_INTERVAL_S: Final = 10.0
#: A stream whose master answers nothing for this many intervals (at least 5 s) is dropped.
REPLY_TIMEOUT_INTERVALS: Final = 10
MIN_REPLY_TIMEOUT_S: Final = 5.0
RECONNECT_MIN_S: Final = 0.2
#: A master that starts leading holds promotions for a lease TTL and a margin (2.5 s by
#: default) and then fails over the volumes of every server it has not heard: a server must be
#: back on it within that. At 5 s a server that had backed off through a 3 s master restart
#: came back after the hold and lost its volumes though it was alive (seen by blockyard chaos).
#: One attempt a second per server costs a dead master nothing.
RECONNECT_MAX_S: Final = 1.0
CONNECT_TIMEOUT_S: Final = 5.0
#: Send times remembered for replies still to come (older replies grant nothing).
MAX_SENT_REMEMBERED: Final = 64
#: Assignments applied at once, across volumes.
MAX_APPLYING: Final = 4
#: An assignment that failed is tried again (on a re-send) no sooner than this.
ASSIGN_RETRY_S: Final = 2.0
#: Volumes whose deletion is still to be reported (bounded by what a server holds).
MAX_PENDING_DELETED: Final = 4096
#: The stopping heartbeat's bound at shutdown.
STOP_TIMEOUT_S: Final = 2.0
LEADER_METADATA_KEY: Final = "blockyard-leader"


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    server_id: str
    iscsi_portals: tuple[str, ...]
    api: str
    replication: str
    zone: str = ""


class HeartbeatClient:
    """See the module docstring. All methods run on the server's event loop."""

    def __init__(
        self,
        manager: VolumeManager,
        identity: ServerIdentity,
        masters: Sequence[str],
        *,
        interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        clock: Callable[[], int] = time.monotonic_ns,
        security: tls.TransportSecurity = tls.PLAINTEXT,
    ) -> None:
        if not masters:
            raise ValueError("at least one master address is needed")
        self._manager = manager
        self.identity = identity
        self._masters = list(masters)
        #: How the masters are dialed: the server's own TLS files (the same rule as its API).
        self._security = security
        self.interval_s = interval_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._call: grpc.aio.StreamStreamCall[mpb.ServerHeartbeat, mpb.MasterReply] | None = None
        self._seq = 0
        self._sent: dict[int, int] = {}
        self._full = True
        self._last_reports: dict[str, bytes] = {}
        self._pending_deleted: set[str] = set()
        self._applying: dict[str, asyncio.Task[None]] = {}
        self._next: dict[str, mpb.Assignment] = {}
        self._applied: dict[str, bytes] = {}
        self._failed_at: dict[str, float] = {}
        self._apply_slots = asyncio.Semaphore(MAX_APPLYING)
        self._stop_requested = asyncio.Event()
        self._stop_sent = asyncio.Event()
        self._redirect: str | None = None
        #: The master this client streams to now ("" while disconnected), and counters for
        #: tests and status.
        self.connected_to = ""
        self.replies = 0
        self.leases_granted = 0
        #: The degrade decision through the same masters (see :mod:`.degrade`).
        self.marker = MasterMarker(self._masters, identity.server_id, security=security)

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            if self.marker.closed:  # started again after a stop
                self.marker = MasterMarker(
                    self._masters, self.identity.server_id, security=self._security
                )
            self._manager.replication.set_marker(self.marker)
            self._stopping = False
            self._stop_requested.clear()
            self._stop_sent.clear()
            self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Tell the master this server stops (bounded), then end the stream."""
        self._stopping = True
        self._stop_requested.set()
        if self._call is not None:
            # The writer sends it (one writer per stream: gRPC allows no concurrent writes).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._stop_sent.wait()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=timeout_s)
        for t in list(self._applying.values()):
            t.cancel()
        if self._applying:
            await asyncio.wait(set(self._applying.values()), timeout=timeout_s)
        await self.marker.close()

    # ---- the stream -----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        index = 0
        while not self._stopping:
            address = self._redirect or self._masters[index % len(self._masters)]
            self._redirect = None
            streamed = False
            try:
                streamed = await self._stream(address)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                leader = _leader_of(exc)
                if exc.code() is grpc.StatusCode.FAILED_PRECONDITION and leader:
                    log.info("master %s is not the leader; following it to %s", address, leader)
                    self._redirect = leader
                    delay = RECONNECT_MIN_S
                else:
                    log.warning("heartbeat stream to %s ended: %s", address, exc.details())
            except (OSError, TimeoutError, BlockyardError, grpc.RpcError) as exc:
                log.warning("heartbeat stream to %s ended: %s", address, exc)
            except Exception:
                # A bug of ours must not end heartbeats for good (the leases would lapse).
                log.exception("heartbeat stream to %s failed", address)
            finally:
                self._call = None
                self.connected_to = ""
            if streamed:
                delay = RECONNECT_MIN_S
            if self._redirect is None:
                index += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _stream(self, address: str) -> bool:
        """One stream; returns whether a reply came (the master was there)."""
        async with tls.open_channel(address, self._security) as channel:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await channel.channel_ready()
            call = mgrpc.MasterStub(channel).Heartbeat()
            self._call = call
            self._full = True
            self._sent.clear()
            got_reply = asyncio.Event()
            try:
                async with aio.task_group() as tg:
                    tg.create_task(self._writer(call))
                    tg.create_task(self._reader(call, address, got_reply))
            except BaseExceptionGroup as group:
                first = _first_cause(group)
                if isinstance(first, EOFError):
                    log.info("master %s closed the heartbeat stream", address)
                    return got_reply.is_set()
                raise first from None
            return got_reply.is_set()

    async def _writer(
        self, call: grpc.aio.StreamStreamCall[mpb.ServerHeartbeat, mpb.MasterReply]
    ) -> None:
        while True:
            msg = await self._heartbeat(full=self._full)
            msg.stopping = self._stopping
            self._full = False
            await call.write(msg)
            if msg.stopping:
                self._stop_sent.set()
                await call.done_writing()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._stop_requested.wait()

    async def _reader(
        self,
        call: grpc.aio.StreamStreamCall[mpb.ServerHeartbeat, mpb.MasterReply],
        address: str,
        got_reply: asyncio.Event,
    ) -> None:
        while True:
            timeout_s = max(MIN_REPLY_TIMEOUT_S, REPLY_TIMEOUT_INTERVALS * self.interval_s)
            try:
                async with asyncio.timeout(timeout_s):
                    reply = await call.read()
            except TimeoutError:
                raise TimeoutError(
                    f"master {address} sent no heartbeat reply for {timeout_s:g} s"
                ) from None
            if reply is grpc.aio.EOF:
                raise EOFError(address)
            assert isinstance(reply, mpb.MasterReply)
            if not got_reply.is_set():
                log.info("heartbeating to master %s (%s)", address, reply.master_id or "?")
                self.connected_to = address
                got_reply.set()
            self.handle_reply(reply)

    # ---- building heartbeats --------------------------------------------------------------

    async def _heartbeat(self, *, full: bool) -> mpb.ServerHeartbeat:
        # The send time is taken before the reports are built: the master trusts a report
        # sent after a MarkOutOfSync's decision time to say whether a replica is in sync, so
        # it must not describe a state older than its stamp. Earlier is also safe for the
        # lease, which runs from this time.
        sent = self._clock()
        devices = self._manager.devices()
        # Memory-only parts on the loop (replication status lives there); sizes off it.
        prefix = self._manager.iqn_prefix
        reports = [_report(vol, dev, prefix) for vol, dev in devices]
        names = [vol.name for vol, _ in devices]
        allocated, capacity = await self._manager.offload(
            "measure volumes for the heartbeat", self._measure, names
        )
        total_allocated = 0
        for report in reports:
            report.allocated_bytes = allocated.get(report.name, 0)
            total_allocated += report.allocated_bytes
        msg = mpb.ServerHeartbeat(
            server_id=self.identity.server_id,
            full=full,
            zone=self.identity.zone,
            capacity_bytes=capacity[1],
            free_bytes=capacity[0],
            allocated_bytes=total_allocated,
        )
        if full:
            msg.addresses.iscsi_portals.extend(self.identity.iscsi_portals)
            msg.addresses.api = self.identity.api
            msg.addresses.replication = self.identity.replication
        present = {r.name for r in reports}
        for report in reports:
            raw = report.SerializeToString(deterministic=True)
            if full or self._last_reports.get(report.name) != raw:
                msg.volumes.append(report)
                self._last_reports[report.name] = raw
        for gone in [n for n in self._last_reports if n not in present]:
            del self._last_reports[gone]
            self._pending_deleted.add(gone)
        for name in sorted(self._pending_deleted - present):
            msg.volumes.append(mpb.VolumeReport(name=name, deleted=True))
        self._pending_deleted.clear()
        self._seq += 1
        msg.seq = self._seq
        msg.sent_mono_ns = sent
        if len(self._sent) >= MAX_SENT_REMEMBERED:
            del self._sent[min(self._sent)]
        self._sent[self._seq] = sent
        return msg

    def _measure(self, names: list[str]) -> tuple[dict[str, int], tuple[int, int]]:
        """In the pool: allocated bytes per volume and (free, total) of the data directory."""
        store = self._manager.store
        allocated: dict[str, int] = {}
        for name in names:
            with contextlib.suppress(BlockyardError, OSError):
                allocated[name] = store.info(name).allocated_bytes
        st = os.statvfs(self._manager.data_dir)
        return allocated, (store.free_bytes(), st.f_blocks * st.f_frsize)

    # ---- replies --------------------------------------------------------------------------

    def handle_reply(self, reply: mpb.MasterReply) -> None:
        """Apply one reply: leases at once, assignments in the background."""
        self.replies += 1
        if reply.heartbeat_interval_ms:
            self.interval_s = min(
                MAX_HEARTBEAT_INTERVAL_S,
                max(MIN_HEARTBEAT_INTERVAL_S, reply.heartbeat_interval_ms / 1000),
            )
        if reply.send_full:
            self._full = True
        sent_ns = self._sent.get(reply.seq)
        # Replies to older heartbeats can only grant less: forget their send times too.
        for seq in [s for s in self._sent if s <= reply.seq]:
            del self._sent[seq]
        if reply.leases and sent_ns is not None and not self._stopping:
            self._grant(reply.leases, sent_ns)
        for assignment in reply.assignments:
            self._submit(assignment)

    def _grant(self, leases: Sequence[mpb.Lease], sent_ns: int) -> None:
        devices = {vol.name: dev for vol, dev in self._manager.devices()}
        for lease in leases:
            ttl_ns = lease.ttl_ms * 1_000_000
            device = devices.get(lease.volume)
            if device is None or device.lease is None:
                continue
            device.lease.grant(lease.epoch, sent_ns, ttl_ns)
            self.leases_granted += 1

    # ---- assignments ----------------------------------------------------------------------

    def _submit(self, a: mpb.Assignment) -> None:
        name = a.volume
        raw = a.SerializeToString(deterministic=True)
        if name in self._applying:
            self._next[name] = a
            return
        vol = self._volume(name)
        if self._applied.get(name) == raw and _holds(vol, a):
            return
        failed = self._failed_at.get(name)
        if failed is not None and time.monotonic() - failed < ASSIGN_RETRY_S:
            return
        if len(self._applying) + len(self._next) >= MAX_PENDING_DELETED:
            return
        task = asyncio.create_task(self._apply(a, raw), name=f"assign-{name}")
        self._applying[name] = task

    def _volume(self, name: str) -> Volume | None:
        for vol, _ in self._manager.devices():
            if vol.name == name:
                return vol
        return None

    async def _apply(self, a: mpb.Assignment, raw: bytes) -> None:
        name = a.volume
        try:
            async with self._apply_slots:
                await self._apply_one(a)
            self._applied[name] = raw
            self._failed_at.pop(name, None)
        except asyncio.CancelledError:
            raise
        except (BlockyardError, ValueError) as exc:
            self._failed_at[name] = time.monotonic()
            log.warning("assignment for volume %s (epoch %d) failed: %s", name, a.epoch, exc)
        finally:
            self._applying.pop(name, None)
            following = self._next.pop(name, None)
            if following is not None and not self._stopping:
                self._submit(following)

    async def _apply_one(self, a: mpb.Assignment) -> None:
        manager = self._manager
        name = a.volume
        want_uuid = uuidlib.UUID(a.uuid) if a.uuid else None
        vol = self._volume(name)
        if a.deleted:
            if vol is not None and want_uuid is not None and vol.uuid != want_uuid:
                log.warning(
                    "not deleting volume %s: the master names UUID %s, this copy is %s",
                    name,
                    want_uuid,
                    vol.uuid,
                )
                return
            await manager.delete_volume(name)
            self._last_reports.pop(name, None)
            self._applied.pop(name, None)
            if len(self._pending_deleted) < MAX_PENDING_DELETED:
                self._pending_deleted.add(name)
            return
        if vol is None:
            if not a.create:
                raise BlockyardError(
                    f"the master assigns volume {name!r}, which is not on this server, "
                    "without asking to create it"
                )
            await manager.create_volume(name, a.size_bytes, volume_uuid=want_uuid)
            vol = self._volume(name)
            if vol is None:
                return
        elif want_uuid is not None and vol.uuid != want_uuid:
            raise BlockyardError(
                f"volume {name!r} here has UUID {vol.uuid}, the master's has {want_uuid}; "
                "the master must delete this copy first"
            )
        if a.size_bytes > vol.size_bytes:
            await manager.expand_volume(name, a.size_bytes)
        if a.epoch < vol.epoch:
            return  # stale: the master prunes it once it sees the newer epoch
        role = ROLE_FROM_PB.get(int(a.role))
        if role is None:
            raise BlockyardError(f"assignment for {name!r} has no valid role ({a.role})")
        mode = MODE_FROM_PB.get(int(a.mode), DurabilityMode.SYNC_ALL)
        replicas = list(a.replicas) if role is Role.PRIMARY else []
        await manager.set_replication(
            name,
            role=role,
            epoch=a.epoch,
            mode=mode,
            replicas=replicas,
            resync_limit_bps=a.resync_limit_bps,
        )


def _holds(vol: Volume | None, a: mpb.Assignment) -> bool:
    """Whether the copy still is what ``a`` asked for (role and epoch; delete: gone)."""
    if a.deleted:
        return vol is None
    return vol is not None and vol.epoch == a.epoch and ROLE_TO_PB[vol.role] == a.role


def _report(vol: Volume, device: ReplicatedDevice, iqn_prefix: str) -> mpb.VolumeReport:
    report = mpb.VolumeReport(
        name=vol.name,
        uuid=str(vol.uuid),
        iqn=volume_iqn(iqn_prefix, vol.name, vol.uuid),
        size_bytes=vol.size_bytes,
        role=ROLE_TO_PB[vol.role],
        epoch=vol.epoch,
        last_lsn=max(vol.last_lsn, 0),
        durable_lsn=max(vol.durable_lsn, 0),
    )
    vr = device.replication
    if vr is not None:
        report.mode = MODE_TO_PB[vr.state.mode]
        for r in vr.report():
            report.replicas.append(
                mpb.ReplicaReport(
                    address=r.address,
                    in_sync=r.in_sync,
                    connected=r.connected,
                    phase=r.phase,
                    acked_lsn=r.acked_lsn,
                    resync_total_bytes=r.resync_total_blocks * 4096,
                    resync_done_bytes=r.resync_done_blocks * 4096,
                )
            )
    return report


def _first_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _leader_of(exc: grpc.aio.AioRpcError) -> str:
    metadata = exc.trailing_metadata()
    if metadata:
        for key, value in metadata:
            if key == LEADER_METADATA_KEY:
                return value if isinstance(value, str) else value.decode()
    return ""
