"""The primary's link to one replica: connect, hand-shake, pick the catch-up plan, then ship
records live and resync blocks, answer for barriers, and tell the commit tracker what the
replica holds. Reconnects with backoff until stopped.

Per session, three tasks share one connection: the **pump** (live records first, then resync
blocks within the bandwidth limit, then barriers and keepalives), the **reader** (acks, resync
progress, keepalives), and whoever asks for a barrier. Storage work (reading resync blocks,
records that must be read back from the WAL, bitmap persistence) runs in the replication worker
pool, never on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from blockyard.engine import wal
from blockyard.engine.volume import Volume, WalRecord
from blockyard.errors import BlockyardError, FeedLostError
from blockyard.replication.channel import (
    CONNECT_TIMEOUT_S,
    KEEPALIVE_INTERVAL_S,
    Channel,
    PeerGoneError,
)
from blockyard.replication.connection import ReplicationConnection, Side
from blockyard.replication.errors import ReplicationProtocolError
from blockyard.replication.messages import (
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
    Hello,
    Keepalive,
    NeedBlocks,
    Plan,
    PlanKind,
    Progress,
    RecordId,
    RecordKind,
    Records,
    ReplicaHello,
    ReplRecord,
    ResyncDone,
)
from blockyard.replication.plan import (
    PlanChoice,
    PlanDecision,
    PrimaryFacts,
    choose_plan,
    segments_to_wire,
)
from blockyard.replication.wire import MAX_RECORDS_PER_BATCH, OPEN_LSN

if TYPE_CHECKING:
    from blockyard.engine.replication_source import Feed
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

    @property
    def volume(self) -> Volume:
        return self._owner.volume

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"link-{self.address}")

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
            except (
                PeerGoneError,
                ReplicationProtocolError,
                BlockyardError,
                OSError,
                TimeoutError,
            ) as exc:
                self.status.last_error = str(exc)
                log.info("replica %s of %s: %s", self.address, self.volume.name, exc)
            finally:
                self.status.connected = False
                self.status.phase = "disconnected"
                self._owner.link_down(self)
                if self._channel is not None:
                    await self._channel.close()
                    self._channel = None
            if time.monotonic() - started > 2 * RECONNECT_MAX_S:
                delay = RECONNECT_MIN_S
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
        history = vol.history
        await ch.send(
            Hello(
                protocol_version=1,
                volume_uuid=vol.uuid,
                volume_name=vol.name,
                size_bytes=vol.size_bytes,
                primary_id=self._owner.primary_id,
                head=RecordId(vol.last_lsn, vol.epoch, vol.generation),
                durable_lsn=vol.durable_lsn,
                history=segments_to_wire(history.segments),
            )
        )
        reply = await ch.recv()
        if not isinstance(reply, ReplicaHello):
            raise PeerGoneError(f"{self.address} answered the Hello with {reply!r}")
        decision = await self._sync(self._decide, reply)
        log.info(
            "replica %s of %s: %s (%s)",
            self.address,
            vol.name,
            decision.choice.value,
            decision.reason,
        )
        self.status.plan = decision.choice.value
        self.status.plan_reason = decision.reason
        feed = await self._sync(
            vol.open_feed,
            self.address,
            decision.start_lsn - 1,
            functools.partial(asyncio.get_running_loop().call_soon_threadsafe, self.notify),
        )
        resync = decision.choice is not PlanChoice.CATCH_UP
        resync_id = secrets.randbits(63) + 1 if resync else 0
        bitmap = vol.replica_bitmap(self.address)
        plan = Plan(
            kind=_PLAN_KIND[decision.choice],
            start_lsn=decision.start_lsn,
            resync_id=resync_id,
            total_blocks=bitmap.set_blocks,
            resume_cursor=0,
            diverged_after_lsn=(
                OPEN_LSN if decision.diverged_after is None else decision.diverged_after
            ),
        )
        try:
            await ch.send(plan)
            if decision.diverged_after is not None:
                await self._collect_need_blocks(ch)
                plan_total = bitmap.set_blocks
            else:
                plan_total = plan.total_blocks
            self.status.connected = True
            self.status.phase = "resyncing" if resync else "catching_up"
            self.status.resync_total_blocks = plan_total if resync else 0
            self.status.resync_done_blocks = 0
            self.status.resync_bytes = 0
            self.status.resync_started_s = time.monotonic()
            session = _Session(self, ch, feed, resync_id)
            self._owner.link_up(self)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(session.pump())
                tg.create_task(session.read())
        finally:
            feed.close()

    def _decide(self, reply: ReplicaHello) -> PlanDecision:
        """Runs in a worker: gathers the facts, decides, and marks a full rebuild."""
        vol = self.volume
        bitmap = vol.replica_bitmap(self.address)
        facts = PrimaryFacts(
            history=tuple(vol.history.segments),
            last_lsn=vol.last_lsn,
            oldest_available_lsn=vol.oldest_available_lsn(),
            covered_lsn=vol.covered_lsn(self.address),
            bitmap_dirty=bitmap.set_blocks > 0,
        )
        decision = choose_plan(facts, reply)
        if decision.choice is PlanChoice.FULL:
            vol.mark_missed(self.address, [(0, vol.size_bytes >> 12)])
        return decision

    async def _collect_need_blocks(self, ch: Channel) -> None:
        while True:
            msg = await ch.recv()
            if isinstance(msg, NeedBlocks):
                extents = [(e.block, e.block_count) for e in msg.extents]
                await self._sync(self.volume.mark_missed, self.address, extents)
                if msg.final:
                    return
            elif isinstance(msg, Keepalive):
                continue
            else:
                raise PeerGoneError(f"{self.address} sent {msg!r} before its diverged blocks")


class _Session:
    """One connected session of a link (pump + reader)."""

    def __init__(self, link: ReplicaLink, ch: Channel, feed: Feed, resync_id: int) -> None:
        self.link = link
        self.ch = ch
        self.feed = feed
        self.resync_id = resync_id
        self.vol = link.volume
        self.bitmap = self.vol.replica_bitmap(link.address)
        self._runs: Iterator[tuple[int, int]] | None = (
            iter(self.bitmap.runs()) if resync_id else None
        )
        self._run_pos: tuple[int, int] | None = None
        self._sent_cursor = 0
        self._confirmed_cursor = 0
        self._pass_done = not resync_id
        self._done_lsn: int | None = None
        self._caught_up_lsn: int | None = None
        self._in_sync = False
        self._limit_bps = link._owner.resync_limit_bps
        self._sent_at = time.monotonic()

    # ---- sending --------------------------------------------------------------------------

    async def pump(self) -> None:
        link = self.link
        while True:
            link._wake.clear()
            barrier = link._barrier
            if barrier is not None:
                link._barrier = None
                await self.ch.send(Barrier(barrier[0], barrier[1]))
            if await self._send_records():
                continue
            if self._caught_up_lsn is None:
                # Everything written so far is on its way: the replica is in sync once it
                # acknowledges this LSN durably.
                self._caught_up_lsn = self.vol.last_lsn
                await self._maybe_in_sync()
            if await self._send_resync():
                continue
            try:
                async with asyncio.timeout(KEEPALIVE_INTERVAL_S):
                    await link._wake.wait()
            except TimeoutError:
                await self.ch.send(Keepalive(self.vol.durable_lsn, self.link._owner.commit_lsn))

    async def _send_records(self) -> bool:
        try:
            records = self.feed.take(RECORDS_BATCH_BYTES, memory_only=True)
            if not records and self.feed.needs_disk:
                records = await self.link._sync(self.feed.take, RECORDS_BATCH_BYTES)
        except FeedLostError as exc:
            raise PeerGoneError(str(exc)) from exc
        if not records:
            return False
        batch: list[ReplRecord] = []
        for rec in records:
            if batch and (rec.lsn != batch[-1].lsn + 1 or len(batch) >= MAX_RECORDS_PER_BATCH):
                await self.ch.send(Records(tuple(batch)))
                batch = []
            batch.append(_to_wire(rec))
        await self.ch.send(Records(tuple(batch)))
        return True

    async def _send_resync(self) -> bool:
        if self._pass_done:
            if self._done_lsn is None and self.resync_id and self._confirmed_all():
                self._done_lsn = self.vol.last_lsn
                await self.ch.send(ResyncDone(self.resync_id, self._done_lsn))
            return False
        if self._sent_cursor - self._confirmed_cursor >= RESYNC_WINDOW_BLOCKS:
            return False  # wait for the replica's progress
        chunk = self._next_chunk()
        if chunk is None:
            self._pass_done = True
            return await self._send_resync()
        block, count = chunk
        read_lsn = self.vol.last_lsn
        runs = await self.link._sync(self.vol.resync_read, block, count)
        wire = tuple(
            BlockRun(b, n, BlockRunFlags.HOLE)
            if d is None
            else BlockRun(b, n, BlockRunFlags.DATA, d)
            for b, n, d in runs
        )
        self._sent_cursor = block + count
        if wire:
            await self.ch.send(Blocks(self.resync_id, self._sent_cursor, read_lsn, wire))
        nbytes = sum(len(d) for _b, _n, d in runs if d is not None)
        self.link.status.resync_bytes += nbytes
        await self._throttle(nbytes)
        return True

    def _next_chunk(self) -> tuple[int, int] | None:
        while True:
            if self._run_pos is None:
                assert self._runs is not None
                self._run_pos = next(self._runs, None)
                if self._run_pos is None:
                    return None
            block, count = self._run_pos
            if count <= 0:
                self._run_pos = None
                continue
            n = min(count, RESYNC_CHUNK_BLOCKS)
            self._run_pos = (block + n, count - n)
            return block, n

    def _confirmed_all(self) -> bool:
        return self._confirmed_cursor >= self._sent_cursor

    async def _throttle(self, nbytes: int) -> None:
        limit = self._limit_bps
        if not limit or not nbytes:
            return
        now = time.monotonic()
        due = max(self._sent_at, now) + nbytes / limit
        self._sent_at = due
        if due > now:
            await asyncio.sleep(due - now)

    # ---- receiving ------------------------------------------------------------------------

    async def read(self) -> None:
        link = self.link
        owner = link._owner
        while True:
            msg = await self.ch.recv()
            if isinstance(msg, Ack):
                link.status.acked_lsn = max(link.status.acked_lsn, msg.durable_lsn)
                owner.replica_acked(link, msg.durable_lsn, msg.barrier_id)
                await link._sync(self.feed.ack, msg.durable_lsn)
                await self._maybe_in_sync()
            elif isinstance(msg, Progress):
                if msg.resync_id != self.resync_id or self.feed.lost:
                    continue
                cursor = min(msg.cursor, self._sent_cursor)
                if cursor > self._confirmed_cursor:
                    self.bitmap.clear(self._confirmed_cursor, cursor - self._confirmed_cursor)
                    link.status.resync_done_blocks += cursor - self._confirmed_cursor
                    self._confirmed_cursor = cursor
                    await link._sync(self.bitmap.persist)
                    link._wake.set()
            elif isinstance(msg, Keepalive):
                continue

    async def _maybe_in_sync(self) -> None:
        if self._in_sync:
            return
        acked = self.link.status.acked_lsn
        if self.resync_id:
            if self._done_lsn is None or acked < self._done_lsn:
                return
            if not await self.link._sync(self._finish_resync):
                # Bits came back while we finished (cannot while connected; be safe): go on.
                self._runs = iter(self.bitmap.runs())
                self._run_pos = None
                self._sent_cursor = self._confirmed_cursor = 0
                self._pass_done = False
                self._done_lsn = None
                self.link._wake.set()
                return
        elif self._caught_up_lsn is None or acked < self._caught_up_lsn:
            return
        self._in_sync = True
        self.link.status.phase = "in_sync"
        await self.link._owner.mark_in_sync(self.link)

    def _finish_resync(self) -> bool:
        bitmap = self.bitmap
        if bitmap.set_blocks:
            return False
        bitmap.deactivate()
        bitmap.persist()
        return True


def _to_wire(rec: WalRecord) -> ReplRecord:
    kind = RecordKind.WRITE if rec.kind is wal.Kind.WRITE else RecordKind.ZERO
    return ReplRecord(
        lsn=rec.lsn,
        epoch=rec.epoch,
        generation=rec.generation,
        kind=kind,
        block=rec.block,
        block_count=rec.blocks,
        data=rec.data if rec.data is not None else b"",
    )
