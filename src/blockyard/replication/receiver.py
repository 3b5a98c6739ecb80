"""The replica server's replication listener (``blockyard serve --replication-listen``).

Each connection is for one volume, named in the primary's Hello. The listener reads that first
frame (bounded, within :data:`HELLO_TIMEOUT_S`), asks the volume manager for the replica copy,
and runs a :class:`~blockyard.replication.replica_session.ReplicaSession` for it. A volume has at
most one live connection: a newer one (the primary reconnecting) replaces the older, which is
closed first, so two streams never interleave on one copy.

Storage work never runs on the event loop: every session call goes to the replication worker
pool, one message at a time in stream order; a bounded queue lets the next few frames arrive
while one is applied, and the socket is not read while it is full, so a slow disk pushes back
on the primary through TCP. Barrier flushes run beside the appliers, at most one at
a time per connection; barriers that arrive meanwhile are answered by the next flush.

Leases (:mod:`.lease`): an answer (Ack, Progress, Keepalive) goes out only while the copy is
still at the connection's epoch — one that accepted a newer epoch answers nothing more on the
old connection — and each Ack (the only answer to a lease probe) is noted in the listener's
``answers`` first, so that a copy promoted later waits out the old primary's replica lease.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Protocol, TypeVar

from blockyard.errors import BlockyardError
from blockyard.replication.channel import (
    DEAD_PEER_TIMEOUT_S,
    KEEPALIVE_INTERVAL_S,
    Channel,
    PeerGoneError,
)
from blockyard.replication.connection import (
    ConnectionState,
    ReplicationConnection,
    Side,
    peek_hello,
)
from blockyard.replication.errors import (
    ErrorCode,
    LocalProtocolError,
    ReplicationProtocolError,
)
from blockyard.replication.lease import AnswerLog, may_answer
from blockyard.replication.messages import (
    Ack,
    Barrier,
    Blocks,
    Error,
    Hello,
    Keepalive,
    Message,
    Plan,
    Records,
    ResyncDone,
)
from blockyard.replication.replica_session import ReplicaSession, ReplicaStore
from blockyard.replication.wire import MAX_FRAME_BYTES, make_error

log = logging.getLogger("blockyard.replication")

T = TypeVar("T")

HELLO_TIMEOUT_S: Final = 10.0
#: Resync blocks applied between two durable progress reports (128 MiB): what a crash of the
#: replica may have to resend, against one fdatasync per report.
PROGRESS_EVERY_BLOCKS: Final = 32768
#: Messages received ahead of the one being applied (each at most one frame, 5 MiB).
APPLY_QUEUE_MESSAGES: Final = 4
#: Resync progress is reported this long after the last resync blocks arrived.
PROGRESS_IDLE_S: Final = 0.05
#: Applied records are acknowledged (after a flush) this long after the last ones arrived;
#: a timer re-armed per batch would never fire under a steady stream, so it is not re-armed.
ACK_IDLE_S: Final = 0.2
#: Longest a replaced connection may take to wind down before the new one goes ahead.
TAKEOVER_TIMEOUT_S: Final = 10.0
#: A batch with another queued behind it sends its receipt anyway when the last one is this
#: old: under a steady stream the queue is never empty, and writers wait on receipts.
RECEIPT_COALESCE_S: Final = 0.0005


class ReplicaVolumes(Protocol):
    """How the listener finds replica copies (the volume manager implements it)."""

    def replica_store(self, name: str, volume_uuid: uuidlib.UUID) -> ReplicaStore | None:
        """The replica copy named ``name`` with that UUID, or None (no such replica here)."""
        ...


class ReplicationListener:
    """Accepts primaries' connections; all methods run on the loop that called :meth:`start`."""

    def __init__(
        self,
        volumes: ReplicaVolumes,
        host: str,
        port: int,
        *,
        executor: ThreadPoolExecutor,
    ) -> None:
        self._volumes = volumes
        self.host = host
        self.port = port
        self._executor = executor
        self._server: asyncio.Server | None = None
        self._active: dict[str, _Receiver] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Volumes whose role is being changed: no connection is taken for them meanwhile.
        self._held: set[str] = set()
        #: When each volume last answered its primary: always kept (a few bytes per volume),
        #: so that it is complete from the first connection when a master promotes a copy.
        self.answers = AnswerLog()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True, limit=MAX_FRAME_BYTES
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("replication listener on %s:%d", self.host, self.port)

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def close(self, timeout_s: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for receiver in list(self._active.values()):
            receiver.stop()
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await server.wait_closed()

    def drop(self, volume_name: str) -> None:
        """End the connection of ``volume_name`` (the volume is deleted or changes role)."""
        receiver = self._active.get(volume_name)
        if receiver is not None:
            receiver.stop()

    async def hold(self, volume_name: str, timeout_s: float = TAKEOVER_TIMEOUT_S) -> None:
        """End ``volume_name``'s connection and take none for it until :meth:`release`, so a
        role change (a promotion) never runs beside a session applying records or a Hello
        to the same copy. Waits (bounded) for the connection to wind down."""
        self._held.add(volume_name)
        receiver = self._active.get(volume_name)
        if receiver is not None:
            receiver.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await receiver.done.wait()

    def release(self, volume_name: str) -> None:
        self._held.discard(volume_name)

    def connected(self, volume_name: str) -> bool:
        return volume_name in self._active

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            await self._serve(reader, writer, peer)
        except (PeerGoneError, ReplicationProtocolError, BlockyardError, OSError) as exc:
            log.info("replication connection from %s ended: %s", peer, exc)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        data = bytearray()
        hello: Hello | None = None
        async with asyncio.timeout(HELLO_TIMEOUT_S):
            while hello is None:
                chunk = await reader.read(MAX_FRAME_BYTES - len(data))
                if not chunk:
                    return
                data += chunk
                hello = peek_hello(bytes(data))
                if hello is None and len(data) >= MAX_FRAME_BYTES:
                    return
        store = None
        if hello.volume_name not in self._held:
            store = self._volumes.replica_store(hello.volume_name, hello.volume_uuid)
        conn = ReplicationConnection(
            Side.REPLICA,
            local_epoch=0 if store is None else store.epoch,
            volume_uuid=hello.volume_uuid,
        )
        channel = Channel(reader, writer, conn, peer=peer)
        conn.receive_data(bytes(data))
        if store is None:
            # Consume the Hello so that our Error is a legal answer, then refuse.
            await channel.recv()
            await channel.send_error(
                make_error(
                    ErrorCode.WRONG_VOLUME,
                    f"no replica copy of volume {hello.volume_name!r} "
                    f"({hello.volume_uuid}) on this server; create it with that UUID and "
                    "give it the replica role first",
                )
            )
            return
        name = hello.volume_name
        previous = self._active.get(name)
        if previous is not None:
            previous.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TAKEOVER_TIMEOUT_S):
                    await previous.done.wait()
        receiver = _Receiver(
            channel, ReplicaSession(store), store, self._executor, name=name, answers=self.answers
        )
        self._active[name] = receiver
        try:
            await receiver.run()
        finally:
            if self._active.get(name) is receiver:
                del self._active[name]


class _Receiver:
    def __init__(
        self,
        channel: Channel,
        session: ReplicaSession,
        store: ReplicaStore,
        executor: ThreadPoolExecutor,
        *,
        name: str = "",
        answers: AnswerLog | None = None,
    ) -> None:
        self._channel = channel
        self._session = session
        self._store = store
        self._executor = executor
        self._name = name
        self._answers = answers
        self._flush_task: asyncio.Task[None] | None = None
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._flush_again = False
        self._pending_barrier = 0
        self._progress_timer: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        #: When (monotonic) the last receipt went.
        self._receipt_at = 0.0
        #: Data-phase messages received and not yet applied (bounded: the socket is not read
        #: while it is full, so a slow disk pushes back on the primary through TCP).
        self._queue: asyncio.Queue[Records | Blocks | ResyncDone | Barrier] = asyncio.Queue(
            APPLY_QUEUE_MESSAGES
        )
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()

    def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def _run_sync(self, fn: Callable[..., T], *args: object) -> T:
        work = self._executor.submit(functools.partial(fn, *args))
        self._inflight.add(work)
        work.add_done_callback(self._inflight.discard)
        return await asyncio.wrap_future(work)

    async def run(self) -> None:
        self._task = asyncio.current_task()
        keepalive = asyncio.create_task(self._keepalive())
        try:
            await self._loop()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except LocalProtocolError as exc:
            await self._channel.send_error(make_error(exc.code, str(exc)))
            raise
        except BlockyardError as exc:
            await self._channel.send_error(make_error(ErrorCode.INTERNAL, str(exc)))
            raise
        finally:
            keepalive.cancel()
            for timer in (self._progress_timer, self._ack_timer):
                if timer is not None:
                    timer.cancel()
            if self._flush_task is not None:
                # Let a running flush finish (it is storage work in a thread anyway).
                with contextlib.suppress(Exception):
                    await asyncio.wait({self._flush_task}, timeout=DEAD_PEER_TIMEOUT_S)
            # Storage work of this session still running in the pool (its awaiting task was
            # cancelled, the thread was not) ends before the session counts as done: whoever
            # waits on ``done`` (a takeover, a promotion) must not run beside it.
            pending = [asyncio.wrap_future(w) for w in list(self._inflight)]
            if pending:
                await asyncio.wait(pending, timeout=DEAD_PEER_TIMEOUT_S)
            await self._channel.close()
            self.done.set()

    async def _loop(self) -> None:
        """Read frames; hand data-phase messages to the applier through a bounded queue, so
        the next frames arrive while the current one is applied (in order, one at a time)."""
        ch = self._channel
        session = self._session
        applier = asyncio.create_task(self._apply_queue())
        try:
            while True:
                msg = await ch.recv()
                if applier.done():
                    applier.result()  # the applier failed: raise its error here
                    return
                if isinstance(msg, Hello):
                    reply = await self._run_sync(session.hello, msg)
                    ch.conn.update_local_epoch(self._store.epoch)
                    await ch.send(reply)
                elif isinstance(msg, Plan):
                    log.info(
                        "replication from %s: %s from LSN %d (resync %d)",
                        ch.peer,
                        msg.kind.name.lower(),
                        msg.start_lsn,
                        msg.resync_id,
                    )
                    replies = await self._run_sync(session.plan, msg)
                    if replies:
                        await ch.send(*replies)
                elif isinstance(msg, Records | Blocks | ResyncDone | Barrier):
                    # A barrier rides the queue too: its flush must cover what came before it.
                    await self._queue.put(msg)
                elif isinstance(msg, Error):
                    return
        finally:
            applier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await applier

    async def _apply_queue(self) -> None:
        session = self._session
        while True:
            msg = await self._queue.get()
            if isinstance(msg, Records):
                # At once where the WAL takes them without waiting (a thread hop is a good
                # part of a replicated write's latency); else in the pool.
                got = session.try_records(msg)
                applied = got if got is not None else await self._run_sync(session.records, msg)
                # A receipt at once, without a sync: in sync_all and sync_quorum the primary
                # acknowledges a write only when the replicas received it (see commit.py).
                # A batch already queued behind it will say more: it answers alone unless
                # the last receipt is RECEIPT_COALESCE_S old (a writer waits on it).
                now = time.monotonic()
                if (
                    self._queue.empty() or now - self._receipt_at >= RECEIPT_COALESCE_S
                ) and not await self._receipt(applied):
                    return
                self._receipt_at = now
                self._ack_soon()
            elif isinstance(msg, Blocks):
                await self._run_sync(session.blocks, msg)
                if session.progress_due_blocks >= PROGRESS_EVERY_BLOCKS:
                    self._request_flush(0)
                else:
                    self._progress_soon()
            elif isinstance(msg, ResyncDone):
                await self._run_sync(session.resync_done, msg)
                self._request_flush(0)
            elif isinstance(msg, Barrier):
                self._request_flush(msg.barrier_id)

    async def _receipt(self, applied: int) -> bool:
        try:
            return await self._answer(Ack(0, self._store.durable_lsn, applied))
        except (PeerGoneError, ReplicationProtocolError, OSError):
            return False

    def _ack_soon(self) -> None:
        """Acknowledge applied records shortly after they stop coming, without waiting for
        a barrier: the primary learns what it may release, and a catching-up replica is seen
        caught up within milliseconds instead of at the next keepalive."""
        if self._ack_timer is None:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(ACK_IDLE_S, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_timer = None
        if self._store.last_lsn > self._store.durable_lsn:
            self._request_flush(0)

    def _progress_soon(self) -> None:
        """Report resync progress shortly after the blocks stop coming (the primary waits
        for it to send more, or to finish the resync)."""
        if self._progress_timer is None:
            loop = asyncio.get_running_loop()
            self._progress_timer = loop.call_later(PROGRESS_IDLE_S, self._progress_due)

    def _progress_due(self) -> None:
        self._progress_timer = None
        if self._session.progress_due_blocks:
            self._request_flush(0)

    def _request_flush(self, barrier_id: int) -> None:
        if barrier_id:
            self._pending_barrier = max(self._pending_barrier, barrier_id)
        if self._flush_task is not None and not self._flush_task.done():
            self._flush_again = True
            return
        self._flush_task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while True:
            self._flush_again = False
            barrier_id, self._pending_barrier = self._pending_barrier, 0
            try:
                result = await self._run_sync(self._session.flush, barrier_id)
            except BlockyardError:
                log.exception("replica flush failed; ending the connection")
                self.stop()
                return
            try:
                if not await self._answer(*result.messages):
                    return
            except (PeerGoneError, ReplicationProtocolError, OSError):
                return
            if not self._flush_again:
                return

    async def _keepalive(self) -> None:
        """Every interval: records applied but not yet durable are flushed and acknowledged
        (so the primary learns what it may release, and when a catching-up replica is in
        sync, without waiting for a barrier); otherwise a keepalive."""
        while True:
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            if self._channel.conn.state is not ConnectionState.DATA:
                continue
            if self._store.last_lsn > self._store.durable_lsn:
                self._request_flush(0)
                continue
            try:
                if not await self._answer(Keepalive(self._store.durable_lsn, 0)):
                    return
            except (PeerGoneError, ReplicationProtocolError, OSError):
                return

    async def _answer(self, *messages: Message) -> bool:
        """Send ``messages`` unless the copy moved past the connection's epoch (then end the
        connection and return False). The check, the note in the answer log and the send's
        first step happen without yielding, so a promotion (which reads the log after the
        epoch moved) sees every answer given at the old epoch."""
        epoch = self._channel.conn.epoch
        if epoch is None or not may_answer(self._store.epoch, epoch):
            log.info(
                "replication of %s from %s: this copy moved to epoch %d; no more answers at "
                "epoch %s",
                self._name,
                self._channel.peer,
                self._store.epoch,
                epoch,
            )
            self.stop()
            return False
        if self._answers is not None and any(isinstance(m, Ack) for m in messages):
            # Only an Ack can answer a lease probe (see link.py); keepalives and progress
            # grant the primary nothing, so they need not delay a promotion.
            self._answers.answered(self._name)
        await self._channel.send(*messages)
        return True
