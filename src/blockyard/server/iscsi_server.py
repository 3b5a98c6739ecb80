"""The iSCSI target's asyncio transport: TCP in, :class:`TargetConnection` in the middle,
:class:`LogicalUnit` underneath.

One :class:`_IscsiProtocol` per TCP connection feeds bytes to its sans-IO connection and runs
the SCSI commands it emits. The loop never waits on storage: the connection's fast path runs
plain READ/WRITE on the loop only when they need no wait (page-cache data, room in the WAL; see
:mod:`blockyard.scsi.lu`); so does this adapter for the READ/WRITEs the fast path left to it
(``LogicalUnit.try_execute``, when ``TargetConnection.clear_to_run`` says no earlier command
on their blocks is still running); commands answered from the logical unit's memory run on the
loop; and every other command — anything that may read, write or sync the volume or a file —
goes to a bounded thread pool, where one volume runs at most ``volume_workers_max`` commands
at once (:mod:`blockyard.server.iscsi_offload`), so a volume stuck on its disk never stalls
the others.

Output is batched: PDUs produced during one event-loop turn leave in one ``writelines``.

Bounds (constants and reasons in :mod:`blockyard.server.iscsi_limits`):

- Connections that have not logged in have their own pool (``prelogin_max``, per peer address
  ``prelogin_per_peer_max``) and ``limits.login_timeout_s`` to finish; logged-in sessions are
  capped by ``sessions_max`` and ``sessions_per_target_max``, checked when the login completes
  and answered "out of resources" beyond them.
- Output: a connection stops taking commands (and reading) while its output in flight, in the
  transport buffer or being produced, is at ``connection_output_bytes_max``; above
  ``server_output_bytes_max`` for all connections together, only connections holding less
  than ``CONNECTION_OUTPUT_FLOOR_BYTES`` take new ones. The sans-IO connection enforces it
  before each command from the room the adapter computes.
- No exception escapes a transport or loop callback: it is logged once with the peer's address,
  that connection is aborted, and every other connection goes on.

Targets come from a :class:`TargetRegistry` the volume manager owns; it may add or remove
targets at any time and calls :meth:`IscsiServer.drop_sessions` after removing one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import cast

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import LoginFailedError, LoginStatus
from blockyard.iscsi.login import MAX_TSIH, TargetConfig
from blockyard.iscsi.target_session import (
    AwaitWrite,
    CloseConnection,
    Event,
    ExecuteCommand,
    LoggedIn,
    ResetRequested,
    TargetConnection,
)
from blockyard.scsi.lu import WOULD_BLOCK, LogicalUnit, WouldBlock
from blockyard.scsi.sense import ScsiResult
from blockyard.server.iscsi_limits import (
    CONNECTION_OUTPUT_FLOOR_BYTES,
    RELEASE_AFTER_DROP_BYTES,
    PreloginGate,
    ServerSettings,
    release_free_memory,
    unread_bytes,
)
from blockyard.server.iscsi_offload import Offloader, runs_inline
from blockyard.server.iscsi_registry import (
    DictTargetRegistry,
    RegistryPortal,
    ServedTarget,
    TargetRegistry,
)

__all__ = [
    "DictTargetRegistry",
    "IscsiServer",
    "ServedTarget",
    "ServerSettings",
    "TargetRegistry",
    "install_uvloop",
]

log = logging.getLogger("blockyard.server.iscsi")

_TICK_INTERVAL_S = 1.0
#: The transport reports "drained" (resume_writing) once its buffer is down to this.
_WRITE_LOW_WATER_BYTES = 1 << 20
#: How often connections held back by the server-wide output budget look again: no transport
#: says when another connection's buffer drains, so this is polled, and only while one waits.
_STARVED_POLL_S = 0.01
#: Refusals and evictions are summed into one log line at most this often, not one per
#: connection, so a flood cannot flood the log too.
_LIMIT_LOG_INTERVAL_S = 10.0


class _IscsiProtocol(asyncio.Protocol):
    """One TCP connection. Every asyncio callback here is a boundary: an exception is logged
    once with the peer's address and ends this connection only (see :meth:`_internal_error`).
    """

    def __init__(self, server: IscsiServer) -> None:
        self._server = server
        self._loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.conn: TargetConnection | None = None
        self.lu: LogicalUnit | None = None
        #: The peer's address ("host:port") for log lines, and its host for per-peer limits.
        self.peer = "unknown peer"
        self.peer_host = ""
        self._flush_scheduled = False
        self._pump_scheduled = False
        self._closing = False
        self._failed = False
        self._write_paused = False
        self._reading_paused = False
        #: This connection's share of IscsiServer.output_bytes (what it last reported).
        self._accounted = 0
        self._pending: set[asyncio.Future[ScsiResult]] = set()
        #: Set once the login was admitted as a session (see IscsiServer.admit_session).
        self.logged_in = False
        self.counted_target: str | None = None

    # -- asyncio callbacks (each one a boundary) --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self._connection_made(cast(asyncio.Transport, transport))
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("connection_made")

    def data_received(self, data: bytes) -> None:
        try:
            conn = self.conn
            if conn is None or self._closing:
                return
            conn.receive_data(data)
            self._pump()
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("data_received")

    def eof_received(self) -> bool | None:
        # None: asyncio closes the transport once what we owe the initiator is written. Nothing
        # here can raise, so this callback needs no boundary of its own.
        return None

    def pause_writing(self) -> None:
        try:
            self._write_paused = True
            self._update_reading()
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("pause_writing")

    def resume_writing(self) -> None:
        try:
            self._write_paused = False
            self._update_reading()
            if self.conn is not None and self.conn.output_blocked:
                self._retry_blocked()
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._closing = True
            # Release every server-wide count first, so nothing leaks if the rest fails.
            self._server.forget_connection(self)
            conn = self.conn
            if conn is not None:
                conn.abort("connection lost")
                if conn.nexus is not None and self.lu is not None:
                    self.lu.nexus_lost(conn.nexus)
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("connection_lost")

    # -- setup --

    def _connection_made(self, transport: asyncio.Transport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass but has its methods.
        self.transport = transport
        server = self._server
        settings = server.settings
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer_host = str(peername[0])
            self.peer = f"{peername[0]}:{peername[1]}"
        # The high-water mark is the connection's output bound, so the transport pauses (and
        # later resumes us) exactly when the connection has to stop taking commands.
        transport.set_write_buffer_limits(
            settings.connection_output_bytes_max - 1,
            min(_WRITE_LOW_WATER_BYTES, settings.connection_output_bytes_max // 4),
        )
        sockname = transport.get_extra_info("sockname")
        host = settings.advertised_host or (sockname[0] if sockname else "127.0.0.1")
        port = sockname[1] if sockname else server.port
        self.conn = TargetConnection(
            RegistryPortal(server.registry, server.allocate_tsih, host, port),
            settings.login,
            limits=settings.limits,
            clock=server.clock or self._loop.time,
            relative_target_port_id=settings.relative_target_port_id,
            target_port_group_id=settings.target_port_group_id,
            admit_session=self._admit_session,
        )
        if not server.admit_connection(self):
            self._closing = True
            transport.abort()
            return
        server.connections.add(self)

    @property
    def idle(self) -> bool:
        """Not logged in, no complete Login Request received, and nothing waiting to be read.

        The last part matters: a real initiator sends its Login Request the moment TCP
        connects, so its bytes are usually in the socket before the loop has read them, and a
        burst of newcomers from the same address must not displace it in between. Asked only
        when a pre-login cap is reached (one ioctl per candidate)."""
        conn = self.conn
        if self.logged_in or (conn is not None and conn.login_requests):
            return False
        return unread_bytes(self.transport) == 0

    def _admit_session(self, session_type: str, target: TargetConfig | None) -> (
        LoginFailedError | None
    ):  # fmt: skip
        return self._server.admit_session(self, session_type, target)

    # -- input and output bounds --

    def _room(self, backlog: int) -> int:
        """How much more output this connection may produce now, given ``backlog`` bytes in
        its transport: its own mark, the server-wide budget (minus every other connection's
        share), and never less than the floor."""
        server = self._server
        settings = server.settings
        room = settings.connection_output_bytes_max - backlog
        shared = settings.server_output_bytes_max - (server.output_bytes - self._accounted)
        shared -= backlog
        return max(min(room, shared), CONNECTION_OUTPUT_FLOOR_BYTES - backlog)

    def _pump(self) -> None:
        """Let the connection take commands within its room, run them, account the output."""
        conn = self.conn
        transport = self.transport
        assert conn is not None and transport is not None
        backlog = transport.get_write_buffer_size()
        conn.output_room_bytes = self._room(backlog)
        self._handle(conn.next_events())
        self._account(backlog + conn.pending_output_bytes + conn.promised_output_bytes)
        if conn.output_blocked != self._reading_paused:
            self._update_reading()

    def _scheduled_pump(self) -> None:
        try:
            self._pump_scheduled = False
            if self.conn is not None and self.transport is not None and not self._closing:
                self._pump()
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("pump")

    def _account(self, held: int) -> None:
        server = self._server
        server.output_bytes += held - self._accounted
        self._accounted = held

    def resample(self) -> None:
        """Report what this connection holds now (its transport may have drained since)."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or self._closing:
            return
        held = transport.get_write_buffer_size() + conn.pending_output_bytes
        self._account(held + conn.promised_output_bytes)

    def _retry_blocked(self) -> None:
        """The connection stopped taking commands: go on now if there is room, else wait for
        whatever will make room (resume_writing, a finishing command, or the server's poll)."""
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or self._closing:
            return
        backlog = transport.get_write_buffer_size()
        held = conn.pending_output_bytes + conn.promised_output_bytes
        if self._room(backlog) > held:
            if not self._pump_scheduled:
                self._pump_scheduled = True
                self._loop.call_soon(self._scheduled_pump)
        elif self._server.settings.connection_output_bytes_max - backlog > held:
            self._server.starve(self)  # only the server-wide budget holds it back
        # else its own mark: the transport is paused and resume_writing retries.

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._closing:
            return
        conn = self.conn
        want_paused = self._write_paused or (conn is not None and conn.output_blocked)
        if want_paused != self._reading_paused:
            self._reading_paused = want_paused
            if want_paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

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
            elif isinstance(event, AwaitWrite):
                self._await_write(event)
        self._schedule_flush()

    def _await_write(self, event: AwaitWrite) -> None:
        """Answer fast writes once the replicas confirmed them (or could not)."""
        lu = self.lu
        if lu is None:
            return
        future = event.pending.future

        def done(_: object) -> None:
            try:
                conn = self.conn
                if conn is None:
                    return
                result = lu.fast_write_outcome(event.opcode, event.lba, event.pending)
                for task_id in event.task_ids:
                    self._handle(conn.command_done(task_id, result))
            except Exception:  # noqa: BLE001 - callback boundary, logged there
                self._internal_error("replicated write completion")

        future.add_done_callback(done)

    def _logged_in(self, event: LoggedIn) -> None:
        # The session was admitted (and counted) by admit_session just before this event.
        if event.target_name:
            target = self._server.registry.lookup(event.target_name)
            if target is None:
                self.close(f"target {event.target_name} was removed during login")
                return
            self.lu = target.logical_unit
        log.info("iSCSI login: %s -> %s (TSIH %d) from %s", event.initiator_name,
                 event.target_name or "discovery", event.tsih, self.peer)  # fmt: skip

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
        if runs_inline(event.cdb):
            result: ScsiResult | WouldBlock = lu.execute(event.nexus, event.cdb, event.data_out)
        elif conn.clear_to_run(event.task_id):
            # A READ/WRITE the fast path did not take (big, R2T, odd flags, behind a command
            # that had to wait): at once if nothing would wait, as the fast path would.
            result = lu.try_execute(event.nexus, event.cdb, event.data_out)
        else:
            result = WOULD_BLOCK
        if result is WOULD_BLOCK:
            self._server.offloader.offload(self, lu, event)
            return
        self._handle(conn.command_done(event.task_id, result))

    def run_off_loop(self, lu: LogicalUnit, event: ExecuteCommand) -> asyncio.Future[ScsiResult]:
        """Start ``event`` on the server's pool (the server's lanes decided it may start)."""
        fut = self._loop.run_in_executor(
            self._server.executor, lu.execute, event.nexus, event.cdb, event.data_out
        )
        self._pending.add(fut)
        return fut

    @property
    def closing(self) -> bool:
        return self._closing

    def done_off_loop(self, task_id: int, fut: asyncio.Future[ScsiResult]) -> None:
        try:
            self._pending.discard(fut)
            conn = self.conn
            if conn is None or fut.cancelled():
                return
            exc = fut.exception()
            if exc is not None:
                # LogicalUnit.execute never raises for peer input; this is a bug on our side.
                log.error("SCSI command from %s raised", self.peer, exc_info=exc)
                self.close("internal error in the SCSI layer")
                return
            self._handle(conn.command_done(task_id, fut.result()))
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("off-loop command completion")

    # -- output --

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        try:
            self._flush_scheduled = False
            conn, transport = self.conn, self.transport
            if conn is None or transport is None or transport.is_closing():
                return
            buffers: list[BytesLike] = conn.data_to_send()
            if buffers:
                transport.writelines(buffers)
            if self._closing:
                transport.close()
                return
            self._account(transport.get_write_buffer_size() + conn.promised_output_bytes)
            if conn.output_blocked:
                self._retry_blocked()
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("flush")

    def tick(self) -> None:
        try:
            conn = self.conn
            if conn is not None and not self._closing:
                self._handle(conn.tick())
                if conn.output_blocked:
                    self._retry_blocked()  # a safety net: every wake-up path is also here
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("tick")

    def close(self, reason: str) -> None:
        """Send what is queued, then close (asyncio flushes the buffer before closing)."""
        if self._closing:
            return
        self._closing = True
        log.info("closing iSCSI connection from %s: %s", self.peer, reason)
        if self.conn is not None:
            self.conn.abort(reason)
        self._schedule_flush()

    def forget_output(self) -> None:
        self._account(0)

    def retry_blocked_safely(self) -> None:
        try:
            if self.conn is not None and self.conn.output_blocked:
                self._retry_blocked()
        except Exception:  # noqa: BLE001 - callback boundary, logged there
            self._internal_error("output retry")

    def evict(self) -> None:
        """Drop at once: an idle pre-login connection displaced by a newcomer."""
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _internal_error(self, where: str) -> None:
        """A bug on our side surfaced in an asyncio callback: log it (once per connection,
        with the traceback and the peer), abort this connection, keep serving the others."""
        first = not self._failed
        self._failed = True
        self._closing = True
        if first:
            log.exception(
                "internal error in %s of the iSCSI connection from %s; aborting that connection",
                where,
                self.peer,
            )
        try:
            self._server.forget_connection(self)
        except Exception:
            log.exception("cannot release the counts of the connection from %s", self.peer)
        if self.transport is not None:
            self.transport.abort()

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
        #: Every open connection, logged in or not.
        self.connections: set[_IscsiProtocol] = set()
        #: Output bytes held by all connections (each reports its share; see _IscsiProtocol).
        self.output_bytes = 0
        #: The highest output_bytes seen by the tick since memory was last released.
        self._output_peak = 0
        self._prelogin: PreloginGate[_IscsiProtocol] = PreloginGate(
            self.settings.prelogin_max, self.settings.prelogin_per_peer_max, _is_idle
        )
        self._logged_in = 0
        self._sessions: dict[str, int] = {}
        self._session_refusals = 0
        self._starved: set[_IscsiProtocol] = set()
        self._starved_timer: asyncio.TimerHandle | None = None
        self._tsihs = itertools.cycle(range(1, MAX_TSIH + 1))
        #: Commands on (or waiting for) the pool, at most volume_workers_max per volume.
        share = self.settings.volume_workers_max
        assert share is not None, "ServerSettings fills it in"
        self.offloader: Offloader[_IscsiProtocol] = Offloader(
            share, lambda: self._executor is not None
        )
        self._server: asyncio.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._next_limit_log = 0.0
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

    @property
    def prelogin_count(self) -> int:
        """Connections that have not completed login."""
        return len(self._prelogin)

    @property
    def logged_in_count(self) -> int:
        """Logged-in sessions, Normal and Discovery."""
        return self._logged_in

    def allocate_tsih(self) -> int:
        return next(self._tsihs)

    def admit_connection(self, proto: _IscsiProtocol) -> bool:
        """A new TCP connection: admit it to the pre-login pool (closing the idle connections
        it displaces) or refuse it."""
        decision = self._prelogin.admit(proto, proto.peer_host)
        for victim in decision.evicted:
            victim.evict()
        return decision.admitted

    def admit_session(
        self, proto: _IscsiProtocol, session_type: str, target: TargetConfig | None
    ) -> LoginFailedError | None:
        """A login is about to complete: count it as a session, or say why it may not be one.
        Runs after authentication, so only an initiator that passed it holds a slot."""
        settings = self.settings
        if target is not None and self.registry.lookup(target.name) is None:
            return LoginFailedError(
                f"target {target.name} was removed during login",
                login_status=LoginStatus.TARGET_REMOVED,
            )
        if self._logged_in >= settings.sessions_max:
            self._session_refusals += 1
            return LoginFailedError(
                f"this portal serves at most {settings.sessions_max} sessions",
                login_status=LoginStatus.OUT_OF_RESOURCES,
            )
        if target is not None:
            if not self.claim_session(target.name):
                self._session_refusals += 1
                return LoginFailedError(
                    f"{target.name} has its {settings.sessions_per_target_max} sessions "
                    "(the per-target maximum)",
                    login_status=LoginStatus.OUT_OF_RESOURCES,
                )
            proto.counted_target = target.name
        self._prelogin.forget(proto)
        self._logged_in += 1
        proto.logged_in = True
        return None

    def forget_connection(self, proto: _IscsiProtocol) -> None:
        """Release everything ``proto`` is counted in (idempotent)."""
        self.connections.discard(proto)
        self._prelogin.forget(proto)
        self._starved.discard(proto)
        if proto.logged_in:
            proto.logged_in = False
            self._logged_in -= 1
        if proto.counted_target is not None:
            self.release_session(proto.counted_target)
            proto.counted_target = None
        proto.forget_output()

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

    # -- the server-wide output budget --

    def starve(self, proto: _IscsiProtocol) -> None:
        """``proto`` waits for the server-wide budget; look again shortly."""
        self._starved.add(proto)
        if self._starved_timer is None and self._loop is not None:
            self._starved_timer = self._loop.call_later(_STARVED_POLL_S, self._feed_starved)

    def _feed_starved(self) -> None:
        self._starved_timer = None
        for proto in list(self.connections):
            try:
                proto.resample()
            except Exception:
                log.exception("cannot resample the output of the connection from %s", proto.peer)
        starved, self._starved = self._starved, set()
        for proto in starved:
            proto.retry_blocked_safely()

    # -- lifecycle --

    async def start(self) -> None:
        """Bind and start accepting. Safe to call again after :meth:`close`."""
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self.clock is None:
            self.clock = self._loop.time
        self._executor = ThreadPoolExecutor(
            max_workers=self.settings.flush_workers, thread_name_prefix="iscsi-io"
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
        self._next_limit_log = self._loop.time() + _LIMIT_LOG_INTERVAL_S
        self._ticker = self._loop.call_later(_TICK_INTERVAL_S, self._tick)
        log.info("iSCSI target listening on %s:%d", self.host, self.port)

    def _tick(self) -> None:
        try:
            for proto in list(self.connections):
                proto.tick()
            self._log_limits()
            self._release_memory_after_drop()
        finally:
            if self._server is not None and self._loop is not None:
                self._ticker = self._loop.call_later(_TICK_INTERVAL_S, self._tick)

    def _release_memory_after_drop(self) -> None:
        """Once the buffered output fell well below its peak (slow readers read or left),
        give the freed memory back to the OS; see release_free_memory for why."""
        held = self.output_bytes
        if held > self._output_peak:
            self._output_peak = held
        elif self._output_peak - held >= RELEASE_AFTER_DROP_BYTES:
            self._output_peak = held
            release_free_memory()

    def _log_limits(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        if now < self._next_limit_log:
            return
        self._next_limit_log = now + _LIMIT_LOG_INTERVAL_S
        refused, evicted = self._prelogin.take_counts()
        sessions, self._session_refusals = self._session_refusals, 0
        if refused or evicted or sessions:
            s = self.settings
            log.warning(
                "iSCSI limits on %s:%d in the last %.0f s: %d connections refused and %d idle "
                "ones closed (%d not logged in at most, %d per peer address); %d logins refused "
                "(%d sessions at most, %d per target)",
                self.host, self.port, _LIMIT_LOG_INTERVAL_S, refused, evicted, s.prelogin_max,
                s.prelogin_per_peer_max, sessions, s.sessions_max, s.sessions_per_target_max,
            )  # fmt: skip

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
        if self._starved_timer is not None:
            self._starved_timer.cancel()
            self._starved_timer = None
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
            self.forget_connection(proto)
        self.connections.clear()
        self._sessions.clear()
        self._prelogin.clear()
        self._starved.clear()
        self._logged_in = 0
        self.output_bytes = 0
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


def _is_idle(proto: _IscsiProtocol) -> bool:
    return proto.idle


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed. Returns whether it is."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
