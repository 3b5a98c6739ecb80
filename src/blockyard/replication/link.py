"""The primary's link to one replica: the asyncio driver of a
:class:`~blockyard.replication.primary_session.PrimarySession`. Connects, hand-shakes, then runs
two tasks on the connection — the **pump** (barriers, live records, then resync chunks within
the bandwidth limit, keepalives when idle) and the **reader** (acks to the commit tracker,
resync progress) — and reconnects with backoff until stopped.

Storage work (reading resync blocks, records read back from the WAL, bitmap persistence) runs in
the replication worker pool, never on the loop; what only touches memory runs inline, so a
barrier's round trip costs no thread hop on the primary.

**Lease probes** (a volume with a lease, see :mod:`.lease`): every TTL/4 the pump sends a
barrier whose id comes from a range of its own (:data:`PROBE_ID_BASE` and up, above any id the
commit tracker hands out) and notes when it went. The replica answers the highest barrier id
it received before its flush, so an Ack naming probe *p* was sent after *p* arrived: the
replica was at this epoch after *p*'s send time, which is what the replica lease needs. The
commit tracker's own barriers are still settled by the Ack's durable LSN when a probe's id
answers for them. No wire change: a probe is an ordinary Barrier (its LSN is what the replica
already acknowledged, so its flush costs nothing new).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from blockyard import aio
from blockyard.engine.volume import Volume
from blockyard.errors import BlockyardError, FeedLostError
from blockyard.replication.channel import (
    CONNECT_TIMEOUT_S,
    KEEPALIVE_INTERVAL_S,
    Channel,
    PeerGoneError,
)
from blockyard.replication.connection import ReplicationConnection, Side
from blockyard.replication.errors import ReplicationProtocolError
from blockyard.replication.lease import PROBES_PER_TTL
from blockyard.replication.messages import (
    Ack,
    Barrier,
    Keepalive,
    NeedBlocks,
    PlanKind,
    Progress,
    ReplicaHello,
)
from blockyard.replication.plan import (
    PlanChoice,
)
from blockyard.replication.primary_session import PrimarySession

if TYPE_CHECKING:
    from blockyard.replication.primary import VolumeReplication

log = logging.getLogger("blockyard.replication")

T = TypeVar("T")

#: Payload bytes per Records frame.
RECORDS_BATCH_BYTES: Final = 1 << 20
#: Blocks read per resync frame (1 MiB).
RESYNC_CHUNK_BLOCKS: Final = 256
#: Resync frames in flight beyond what the replica confirmed durable; bounds what a crash of
#: the replica makes us resend and the memory either side holds.
RESYNC_WINDOW_BLOCKS: Final = 1 << 16
RECONNECT_MIN_S: Final = 0.2
RECONNECT_MAX_S: Final = 5.0
#: Lease probe barrier ids start here (the commit tracker counts up from 1; u64 on the wire).
PROBE_ID_BASE: Final = 1 << 63
#: Probes remembered while unanswered (older ones could only grant an expired lease).
MAX_PROBES_IN_FLIGHT: Final = 16
#: A probe this close to due goes now (a timer may fire a hair early; no busy loop).
PROBE_EARLY_S: Final = 0.001
_PLAN_KIND: Final = {
    PlanChoice.CATCH_UP: PlanKind.CATCH_UP,
    PlanChoice.DELTA: PlanKind.DELTA,
    PlanChoice.FULL: PlanKind.FULL,
}


@dataclass(slots=True)
class LinkStatus:
    """What the management API and metrics report for one replica."""

    address: str
    connected: bool = False
    phase: str = "connecting"
    plan: str = ""
    plan_reason: str = ""
    acked_lsn: int = 0
    resync_total_blocks: int = 0
    resync_done_blocks: int = 0
    resync_started_s: float = 0.0
    resync_bytes: int = 0
    last_error: str = ""


class ReplicaLink:
    """Keeps one replica fed. Runs on the owning :class:`VolumeReplication`'s loop."""

    def __init__(self, owner: VolumeReplication, address: str) -> None:
        self._owner = owner
        self.address = address
        self.status = LinkStatus(address)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._barrier: tuple[int, int] | None = None
        self._channel: Channel | None = None
        self._session_core: PrimarySession | None = None
        self._reached_data_phase = False
        #: Lease probes sent on this connection and not yet answered: id → send time (ns).
        self._probes: dict[int, int] = {}
        self._next_probe_id = PROBE_ID_BASE
        self._next_probe_ns = 0

    @property
    def volume(self) -> Volume:
        return self._owner.volume

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"link-{self.address}")
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The connection loop ends only when stopped; anything else is a bug that would
        leave the replica unfed forever without a word: say so."""
        if self._stopping:
            return
        if task.cancelled():
            log.error(
                "replica %s of %s: its connection loop was cancelled without being stopped; "
                "the replica is no longer fed", self.address, self.volume.name,
            )  # fmt: skip
            return
        exc = task.exception()
        log.error(
            "replica %s of %s: its connection loop ended (%s); the replica is no longer fed",
            self.address, self.volume.name, "returned" if exc is None else repr(exc),
            exc_info=exc,
        )  # fmt: skip

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait({task}, timeout=5.0)

    def send_barrier(self, barrier_id: int, lsn: int) -> None:
        """Ask the replica to make everything up to ``lsn`` durable (sent by the pump)."""
        self._barrier = (barrier_id, lsn)
        self._wake.set()

    def marked_out_of_sync(self) -> None:
        """The tracker dropped this replica while its session may still be up: the session
        watches for it to catch up again."""
        session = self._session_core
        if session is not None:
            session.rearm()
            self.status.phase = "catching_up"
            self._wake.set()

    def notify(self) -> None:
        """New records (called on the loop; the feed's callback schedules it)."""
        self._wake.set()

    async def _sync(self, fn: Callable[..., T], *args: object) -> T:
        return await self._owner.run_sync(fn, *args)

    # ---- connection loop ------------------------------------------------------------------

    async def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                cause = _first_cause(exc)
                self.status.last_error = str(cause)
                if isinstance(cause, _EXPECTED):
                    log.info("replica %s of %s: %s", self.address, self.volume.name, cause)
                else:
                    log.exception(
                        "replica %s of %s: session failed", self.address, self.volume.name
                    )
            finally:
                self.status.connected = False
                self.status.phase = "disconnected"
                if not self._stopping:
                    # Being stopped (the volume closes or leaves replication) says nothing
                    # about the replica: it keeps its in-sync flag.
                    self._owner.link_down(self)
                if self._channel is not None:
                    await self._channel.close()
                    self._channel = None
            if self._reached_data_phase or time.monotonic() - started > 2 * RECONNECT_MAX_S:
                # A session that got as far as shipping: the peer is there, redial quickly.
                delay = RECONNECT_MIN_S
                self._reached_data_phase = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _session(self) -> None:
        host, _, port = self.address.rpartition(":")
        self.status.phase = "connecting"
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        vol = self.volume
        conn = ReplicationConnection(Side.PRIMARY, local_epoch=vol.epoch, volume_uuid=vol.uuid)
        ch = Channel(reader, writer, conn, peer=self.address)
        self._channel = ch
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def notify_threadsafe() -> None:
            # Called by writers under the volume lock: from another thread only schedule; on
            # the loop's own thread (the iSCSI fast path) set the event at once, which only
            # schedules the pump too, without a trip through the loop's self-pipe.
            if threading.get_ident() == loop_thread:
                self.notify()
            else:
                loop.call_soon_threadsafe(self.notify)

        session = PrimarySession(
            vol, self.address, primary_id=self._owner.primary_id, notify=notify_threadsafe
        )
        self._session_core = session
        try:
            await ch.send(session.hello())
            reply = await ch.recv()
            if not isinstance(reply, ReplicaHello):
                raise PeerGoneError(f"{self.address} answered the Hello with {reply!r}")
            plan = await self._sync(session.handshake, reply)
            decision = session.decision
            assert decision is not None
            log.info(
                "replica %s of %s: %s (%s)",
                self.address,
                vol.name,
                decision.choice.value,
                decision.reason,
            )
            self._report(session)  # this session's counters, not the previous one's
            self.status.plan = decision.choice.value
            self.status.plan_reason = decision.reason
            if session.resync_id:
                # Its copy is not whole until the resync ends: it must not count meanwhile.
                self._owner.link_behind(self, f"it needs a {decision.choice.value} resync")
            await ch.send(plan)
            while session.awaits_need_blocks:
                msg = await ch.recv()
                if isinstance(msg, NeedBlocks):
                    if await self._sync(session.need_blocks, msg):
                        break
                elif not isinstance(msg, Keepalive):
                    raise PeerGoneError(f"{self.address} sent {msg!r} before its diverged blocks")
            session.start()
            self._probes.clear()
            self._next_probe_ns = 0
            self._reached_data_phase = True
            self.status.connected = True
            self.status.phase = "resyncing" if session.resync_id else "catching_up"
            self.status.resync_started_s = time.monotonic()
            self._owner.link_up(self)
            async with aio.task_group() as tg:
                tg.create_task(self._pump(ch, session))
                tg.create_task(self._read(ch, session))
        finally:
            self._session_core = None
            session.close()

    def _probe_wait_s(self) -> float | None:
        """Seconds until the next lease probe is due (0: now), None without a lease."""
        lease = self._owner.lease
        if lease is None or not lease.required:
            return None
        return max(0.0, (self._next_probe_ns - lease.clock()) / 1e9)

    async def _probe(self, ch: Channel, session: PrimarySession) -> None:
        lease = self._owner.lease
        assert lease is not None
        probe_id = self._next_probe_id
        self._next_probe_id += 1
        sent_ns = lease.clock()
        self._next_probe_ns = sent_ns + lease.ttl_ns // PROBES_PER_TTL
        if len(self._probes) >= MAX_PROBES_IN_FLIGHT:
            del self._probes[min(self._probes)]
        self._probes[probe_id] = sent_ns
        await ch.send(Barrier(probe_id, session.acked_lsn))

    def _probe_answered(self, barrier_id: int, epoch: int | None) -> None:
        sent_ns = self._probes.get(barrier_id)
        if sent_ns is None or epoch is None:
            return
        # The replica received every probe up to this one: none of them can grant more.
        for probe_id in [p for p in self._probes if p <= barrier_id]:
            del self._probes[probe_id]
        lease = self._owner.lease
        if lease is not None:
            lease.answered(self.address, epoch, sent_ns)

    async def _pump(self, ch: Channel, session: PrimarySession) -> None:
        pace = _Pacer(self._owner.resync_limit_bps)
        while True:
            self._wake.clear()
            probe_s = self._probe_wait_s()
            if probe_s is not None and probe_s <= PROBE_EARLY_S:
                await self._probe(ch, session)
            barrier, self._barrier = self._barrier, None
            if barrier is not None:
                session.barrier(*barrier)
            allow = pace.ready()
            try:
                out = session.outgoing(memory_only=True, resync=allow)
                if out.needs_io:
                    sent = out.messages
                    if sent:
                        await ch.send(*sent)
                    out = await self._sync(
                        functools.partial(session.outgoing, memory_only=False, resync=allow)
                    )
            except FeedLostError as exc:
                raise PeerGoneError(str(exc)) from exc
            if out.messages:
                await ch.send(*out.messages)
            self._report(session)
            if out.resync_bytes:
                self._owner.observer.resync_sent(self.volume.name, self.address, out.resync_bytes)
                pace.sent(out.resync_bytes)
            if not out.idle:
                continue
            # Idle: wait for records, a barrier or progress — or until the bandwidth limit lets
            # the next resync chunk go (live records never wait for the limit).
            paced = not allow and session.resync_ready
            timeout = min(KEEPALIVE_INTERVAL_S, pace.wait_s()) if paced else KEEPALIVE_INTERVAL_S
            probe_s = self._probe_wait_s()
            probing = probe_s is not None and probe_s < timeout
            if probing and probe_s is not None:
                timeout = probe_s
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                # A probe due now goes at the top of the loop (it keeps the peer from
                # thinking us dead as well as a keepalive would).
                if not paced and not probing:
                    await ch.send(session.keepalive(self._owner.commit_lsn))

    async def _read(self, ch: Channel, session: PrimarySession) -> None:
        while True:
            msg = await ch.recv()
            if isinstance(msg, Keepalive):
                if msg.durable_lsn <= session.acked_lsn:
                    continue
                # A replica's keepalive carries its durable LSN: an acknowledgement like any
                # (an idle replica that holds everything has nothing else to say).
                msg = Ack(0, msg.durable_lsn, msg.durable_lsn)
            if isinstance(msg, Ack):
                # The commit point first, on the loop: a flush or a write waits on it.
                self._owner.replica_acked(self, msg.durable_lsn, msg.barrier_id, msg.applied_lsn)
                if msg.barrier_id >= PROBE_ID_BASE:
                    self._probe_answered(msg.barrier_id, ch.conn.epoch)
                elif (
                    not msg.barrier_id and msg.durable_lsn <= session.acked_lsn and session.in_sync
                ):
                    # A receipt (sent after every applied batch) with nothing new for the
                    # session: no trip to a worker thread for it.
                    continue
            if isinstance(msg, Ack | Progress):
                try:
                    heard = await self._sync(session.heard, msg)
                except FeedLostError as exc:
                    raise PeerGoneError(str(exc)) from exc
                self._report(session)
                if heard.progressed:
                    self._wake.set()
                if heard.in_sync:
                    self.status.phase = "in_sync"
                    self._owner.link_caught_up(self)

    def _report(self, session: PrimarySession) -> None:
        st = self.status
        st.acked_lsn = session.acked_lsn
        st.resync_total_blocks = session.resync_total_blocks
        st.resync_done_blocks = session.resync_done_blocks
        st.resync_bytes = session.resync_bytes


#: Session endings that are part of life (peer gone, refused, storage trouble): logged briefly.
_EXPECTED = (PeerGoneError, ReplicationProtocolError, BlockyardError, OSError, TimeoutError)


def _first_cause(exc: BaseException) -> BaseException:
    """The first real error inside the task group's ExceptionGroup(s)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class _Pacer:
    """Resync bandwidth limit: after ``n`` bytes the next chunk may go ``n / limit_bps`` later,
    so the average stays at the limit (0: no limit). It never delays anything else."""

    def __init__(self, limit_bps: int) -> None:
        self._limit = limit_bps
        self._due = time.monotonic()

    def ready(self) -> bool:
        return not self._limit or time.monotonic() >= self._due

    def wait_s(self) -> float:
        return max(0.001, self._due - time.monotonic())

    def sent(self, nbytes: int) -> None:
        if self._limit:
            self._due = max(self._due, time.monotonic()) + nbytes / self._limit
