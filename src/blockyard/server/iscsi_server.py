"""The iSCSI target's asyncio transport: TCP in, :class:`TargetConnection` in the middle,
:class:`LogicalUnit` underneath.

One :class:`_IscsiProtocol` per TCP connection feeds bytes to its sans-IO connection and runs
the SCSI commands it emits. Reads and plain writes are page-cache work and run inline on the
loop; anything that may call ``fdatasync`` (SYNCHRONIZE CACHE, FUA writes, write-through mode,
PERSISTENT RESERVE OUT, and the bulk WRITE SAME / UNMAP / VERIFY / COMPARE AND WRITE) goes to a
bounded thread pool so one volume's flush never stalls every other session.

Output is batched: PDUs produced during one event-loop turn leave in one ``writelines``.
Backpressure: when the transport's write buffer passes its high-water mark the connection stops
reading until it drains, so a slow reader cannot make us buffer without bound.

Targets come from a :class:`TargetRegistry` the volume manager owns; it may add or remove
targets at any time and calls :meth:`IscsiServer.drop_sessions` after removing one.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, cast

from blockyard.blockdev import BytesLike
from blockyard.iscsi.discovery import DiscoveryTarget, Portal, send_targets_pairs
from blockyard.iscsi.login import MAX_TSIH, TargetConfig, TargetLoginSettings
from blockyard.iscsi.target_session import (
    CloseConnection,
    CommandInspector,
    Event,
    ExecuteCommand,
    LoggedIn,
    ResetRequested,
    SessionLimits,
    TargetConnection,
)
from blockyard.iscsi.text import TextPairs
from blockyard.scsi.constants import Op
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.sense import ScsiResult

log = logging.getLogger("blockyard.server.iscsi")

#: Operations that may call BlockDevice.flush() or move a lot of data in one call.
_BLOCKING_OPS = frozenset(
    {
        Op.SYNCHRONIZE_CACHE_10,
        Op.SYNCHRONIZE_CACHE_16,
        Op.PERSISTENT_RESERVE_OUT,  # the reservation store fsyncs its file
        Op.WRITE_SAME_10,
        Op.WRITE_SAME_16,
        Op.UNMAP,
        Op.VERIFY_10,
        Op.VERIFY_12,
        Op.VERIFY_16,
        Op.COMPARE_AND_WRITE,
        Op.WRITE_AND_VERIFY_10,
        Op.WRITE_AND_VERIFY_12,
        Op.WRITE_AND_VERIFY_16,
    }
)
#: Writes whose FUA bit (CDB byte 1, bit 3, SBC-4 §5.40) makes them flush.
_FUA_WRITE_OPS = frozenset({Op.WRITE_10, Op.WRITE_12, Op.WRITE_16})
_WRITE_OPS = _FUA_WRITE_OPS | {Op.WRITE_6}
_FUA_BIT = 0x08
_TICK_INTERVAL_S = 1.0
_WRITE_HIGH_WATER_BYTES = 4 << 20
_WRITE_LOW_WATER_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ServedTarget:
    """What the server exports under one IQN: the login configuration (name, CHAP, ACL,
    portal group tag) and the logical unit behind LUN 0."""

    config: TargetConfig
    logical_unit: LogicalUnit

    @property
    def name(self) -> str:
        return self.config.name


class TargetRegistry(Protocol):
    """Maps IQNs to what to serve. Must be thread-safe and quick: it is called on the loop.

    Removing a target stops new logins at once; existing sessions continue until the owner
    calls :meth:`IscsiServer.drop_sessions`.
    """

    def lookup(self, target_name: str) -> ServedTarget | None: ...

    def targets(self) -> Sequence[ServedTarget]: ...


class DictTargetRegistry:
    """A :class:`TargetRegistry` kept in a dict under a lock. Thread-safe."""

    def __init__(self, targets: Sequence[ServedTarget] = ()) -> None:
        self._lock = threading.Lock()
        self._targets: dict[str, ServedTarget] = {t.name: t for t in targets}

    def add(self, target: ServedTarget) -> None:
        """Export ``target``; an existing target of the same name is replaced."""
        with self._lock:
            self._targets[target.name] = target

    def remove(self, target_name: str) -> ServedTarget | None:
        with self._lock:
            return self._targets.pop(target_name, None)

    def lookup(self, target_name: str) -> ServedTarget | None:
        with self._lock:
            return self._targets.get(target_name)

    def targets(self) -> Sequence[ServedTarget]:
        with self._lock:
            return tuple(self._targets.values())


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Server-wide bounds.

    ``flush_workers`` threads run commands that may block; at most ``sessions_max`` sessions
    in total and ``sessions_per_target_max`` per target are served (a login beyond them is
    closed right after it completes, and logged). ``relative_target_port_id`` and
    ``target_port_group_id`` identify this listener's SCSI target port (SPC-4 §7.8.6): a server
    with several listeners gives each its own, so ALUA states can differ per portal.
    """

    login: TargetLoginSettings = field(default_factory=TargetLoginSettings)
    limits: SessionLimits = field(default_factory=SessionLimits)
    sessions_max: int = 256
    sessions_per_target_max: int = 16
    flush_workers: int = 4
    advertised_host: str | None = None
    relative_target_port_id: int = 1
    target_port_group_id: int = 1

    def __post_init__(self) -> None:
        if self.sessions_max < 1 or self.sessions_per_target_max < 1 or self.flush_workers < 1:
            raise ValueError("sessions_max, sessions_per_target_max and flush_workers must be >= 1")
        # SPC-4 §7.8.6.6: both identifiers are 16-bit; relative port 0 is reserved.
        if not 1 <= self.relative_target_port_id <= 0xFFFF:
            raise ValueError("relative_target_port_id must be 1..65535")
        if not 0 <= self.target_port_group_id <= 0xFFFF:
            raise ValueError("target_port_group_id must be 0..65535")


class _Portal:
    """The sans-IO connection's view of the server, one per connection (it knows which
    local address to advertise in SendTargets)."""

    def __init__(self, server: IscsiServer, host: str, port: int) -> None:
        self._server = server
        self._host = host
        self._port = port

    def lookup(self, target_name: str) -> TargetConfig | None:
        target = self._server.registry.lookup(target_name)
        return None if target is None else target.config

    def allocate_tsih(self) -> int:
        return self._server.allocate_tsih()

    def inspector(self, target_name: str) -> CommandInspector | None:
        target = self._server.registry.lookup(target_name)
        return None if target is None else target.logical_unit

    def send_targets(
        self, value: str, *, initiator_name: str, session_target: str | None
    ) -> TextPairs:
        visible = [
            DiscoveryTarget(t.name, (Portal(self._host, self._port, t.config.portal_group_tag),))
            for t in self._server.registry.targets()
            if t.config.allowed_initiators is None or initiator_name in t.config.allowed_initiators
        ]
        return send_targets_pairs(value, visible, session_target=session_target)


def _runs_off_loop(cdb: bytes, lu: LogicalUnit) -> bool:
    opcode = cdb[0]
    if opcode in _BLOCKING_OPS:
        return True
    if opcode in _WRITE_OPS:
        return lu.write_through or (opcode in _FUA_WRITE_OPS and bool(cdb[1] & _FUA_BIT))
    return False


class _IscsiProtocol(asyncio.Protocol):
    def __init__(self, server: IscsiServer) -> None:
        self._server = server
        self._loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.conn: TargetConnection | None = None
        self.lu: LogicalUnit | None = None
        self._flush_scheduled = False
        self._closing = False
        self._paused = False
        self._pending: set[asyncio.Future[ScsiResult]] = set()
        self.counted_target: str | None = None

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass but has its methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(_WRITE_HIGH_WATER_BYTES, _WRITE_LOW_WATER_BYTES)
        server = self._server
        sockname = transport.get_extra_info("sockname")
        host = server.settings.advertised_host or (sockname[0] if sockname else "127.0.0.1")
        port = sockname[1] if sockname else server.port
        if len(server.connections) >= server.settings.sessions_max:
            log.warning(
                "refusing an iSCSI connection: %d connections is the configured maximum",
                server.settings.sessions_max,
            )
            transport.abort()
            return
        self.conn = TargetConnection(
            _Portal(server, host, port),
            server.settings.login,
            limits=server.settings.limits,
            clock=server.clock or self._loop.time,
            relative_target_port_id=server.settings.relative_target_port_id,
            target_port_group_id=server.settings.target_port_group_id,
        )
        server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self._closing:
            return
        conn.receive_data(data)
        self._handle(conn.next_events())

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        # Stop taking new commands until the initiator reads what we owe it.
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            if not self._closing:
                self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        server = self._server
        server.connections.discard(self)
        if self.counted_target is not None:
            server.release_session(self.counted_target)
            self.counted_target = None
        conn = self.conn
        if conn is not None:
            conn.abort("connection lost")
            if conn.nexus is not None and self.lu is not None:
                self.lu.nexus_lost(conn.nexus)

    # -- events --

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, ExecuteCommand):
                self._execute(event)
            elif isinstance(event, LoggedIn):
                self._logged_in(event)
            elif isinstance(event, ResetRequested):
                self._reset(event)
            elif isinstance(event, CloseConnection):
                self.close(event.reason)
        self._schedule_flush()

    def _logged_in(self, event: LoggedIn) -> None:
        if not event.target_name:
            return
        server = self._server
        target = server.registry.lookup(event.target_name)
        if target is None:
            self.close(f"target {event.target_name} was removed during login")
            return
        if not server.claim_session(event.target_name):
            log.warning(
                "closing session of %s to %s: %d sessions per target is the maximum",
                event.initiator_name,
                event.target_name,
                server.settings.sessions_per_target_max,
            )
            self.close("too many sessions for this target")
            return
        self.counted_target = event.target_name
        self.lu = target.logical_unit
        log.info("iSCSI login: %s -> %s (TSIH %d)", event.initiator_name, event.target_name,
                 event.tsih)  # fmt: skip

    def _reset(self, event: ResetRequested) -> None:
        if self.lu is not None:
            self.lu.reset(event.kind)
        if event.cold and self.conn is not None:
            target = self.conn.target_name
            # The response goes out first; then every session of the target is dropped.
            self._loop.call_soon(self._server.drop_sessions, target)

    def _execute(self, event: ExecuteCommand) -> None:
        lu = self.lu
        conn = self.conn
        assert conn is not None
        if lu is None:
            return
        if _runs_off_loop(event.cdb, lu):
            fut = self._loop.run_in_executor(
                self._server.executor, lu.execute, event.nexus, event.cdb, event.data_out
            )
            self._pending.add(fut)
            fut.add_done_callback(functools.partial(self._done_off_loop, event.task_id))
            return
        result = lu.execute(event.nexus, event.cdb, event.data_out)
        self._handle(conn.command_done(event.task_id, result))

    def _done_off_loop(self, task_id: int, fut: asyncio.Future[ScsiResult]) -> None:
        self._pending.discard(fut)
        conn = self.conn
        if conn is None or fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            # LogicalUnit.execute never raises for peer input; this is a bug on our side.
            log.error("SCSI command raised", exc_info=exc)
            self.close("internal error in the SCSI layer")
            return
        self._handle(conn.command_done(task_id, fut.result()))

    # -- output --

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or transport.is_closing():
            return
        buffers: list[BytesLike] = conn.data_to_send()
        if buffers:
            transport.writelines(buffers)
        if self._closing:
            transport.close()

    def tick(self) -> None:
        if self.conn is not None and not self._closing:
            self._handle(self.conn.tick())

    def close(self, reason: str) -> None:
        """Send what is queued, then close (asyncio flushes the buffer before closing)."""
        if self._closing:
            return
        self._closing = True
        log.info("closing iSCSI connection: %s", reason)
        if self.conn is not None:
            self.conn.abort(reason)
        self._schedule_flush()

    @property
    def pending(self) -> set[asyncio.Future[ScsiResult]]:
        return self._pending


class IscsiServer:
    """Serves the registry's targets on ``host:port``. All methods run on the event loop
    that called :meth:`start` (the volume manager calls in there too)."""

    def __init__(
        self,
        registry: TargetRegistry,
        host: str = "0.0.0.0",
        port: int = 3260,
        *,
        settings: ServerSettings | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self._requested_port = port
        self.settings = settings or ServerSettings()
        self.clock: Callable[[], float] | None = clock
        self.connections: set[_IscsiProtocol] = set()
        self._sessions: dict[str, int] = {}
        self._tsihs = itertools.cycle(range(1, MAX_TSIH + 1))
        self._server: asyncio.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self.port = port

    # -- accessors used by the protocol --

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "IscsiServer.start() has not run"
        return self._loop

    @property
    def executor(self) -> ThreadPoolExecutor:
        assert self._executor is not None, "IscsiServer.start() has not run"
        return self._executor

    @property
    def serving(self) -> bool:
        return self._server is not None

    def allocate_tsih(self) -> int:
        return next(self._tsihs)

    def claim_session(self, target_name: str) -> bool:
        count = self._sessions.get(target_name, 0)
        if count >= self.settings.sessions_per_target_max:
            return False
        self._sessions[target_name] = count + 1
        return True

    def release_session(self, target_name: str) -> None:
        count = self._sessions.get(target_name, 0) - 1
        if count > 0:
            self._sessions[target_name] = count
        else:
            self._sessions.pop(target_name, None)

    def session_count(self, target_name: str | None = None) -> int:
        if target_name is None:
            return sum(self._sessions.values())
        return self._sessions.get(target_name, 0)

    # -- lifecycle --

    async def start(self) -> None:
        """Bind and start accepting. Safe to call again after :meth:`close`."""
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self.clock is None:
            self.clock = self._loop.time
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.flush_workers, thread_name_prefix="iscsi-flush"
        )
        try:
            self._server = await self._loop.create_server(
                lambda: _IscsiProtocol(self),
                self.host,
                self._requested_port,
                reuse_address=True,
                start_serving=True,
            )
        except OSError:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self._requested_port
        self._ticker = self._loop.call_later(_TICK_INTERVAL_S, self._tick)
        log.info("iSCSI target listening on %s:%d", self.host, self.port)

    def _tick(self) -> None:
        for proto in list(self.connections):
            proto.tick()
        if self._server is not None and self._loop is not None:
            self._ticker = self._loop.call_later(_TICK_INTERVAL_S, self._tick)

    def drop_sessions(self, target_name: str) -> int:
        """Close every connection logged in to ``target_name`` (after removing it from the
        registry, so the initiator cannot log straight back in). Returns how many."""
        dropped = 0
        for proto in list(self.connections):
            if proto.conn is not None and proto.conn.target_name == target_name:
                proto.close(f"target {target_name} was removed")
                dropped += 1
        return dropped

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, end every session, wait up to ``timeout_s`` for commands running
        in the thread pool, then abort what is left. Returns within about ``timeout_s``."""
        server = self._server
        if server is None:
            return
        self._server = None
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        server.close()
        pending: set[asyncio.Future[ScsiResult]] = set()
        for proto in list(self.connections):
            pending |= proto.pending
            proto.close("server shutting down")
        if pending:
            _done, not_done = await asyncio.wait(pending, timeout=timeout_s)
            if not_done:
                log.warning("%d SCSI commands still running at shutdown", len(not_done))
        # Give the closing transports one turn to write their last PDUs, then abort stragglers.
        await asyncio.sleep(0)
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.abort()
        self.connections.clear()
        self._sessions.clear()
        try:
            async with asyncio.timeout(max(0.1, timeout_s)):
                await server.wait_closed()
        except TimeoutError:
            log.warning("iSCSI listener did not close within %.1f s", timeout_s)
        executor = self._executor
        self._executor = None
        if executor is not None:
            # Running flushes finish in their threads; the loop does not wait for them.
            executor.shutdown(wait=False, cancel_futures=True)


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed. Returns whether it is."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
