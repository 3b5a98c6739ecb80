"""One initiator-side iSCSI connection and its single-connection session, on asyncio.

The byte work is the sans-IO core's: :class:`~blockyard.iscsi.reader.PduReader` frames the
target's PDUs, :func:`~blockyard.iscsi.pdu.encode_pdu_buffers` encodes ours, and
:class:`~blockyard.iscsi.login.InitiatorLogin` drives the login. This module only adds what a
session needs on top: the CmdSN window (RFC 7143 §4.2.2.1), ITTs, Data-In reassembly into the
caller's buffer, immediate/unsolicited data and R2T answers (RFC 7143 §11.8), NOP keepalive
both ways (§11.18, §11.19), ABORT TASK on a command timeout (§11.5), Logout (§11.14) and
SendTargets discovery (Appendix C).

:class:`IscsiConnection` keeps opening and login, the asyncio protocol, receive dispatch,
sequence numbers, output and failure; its parts are mixins: SCSI commands (both paths,
Data-Out, Data-In and responses) in :mod:`~blockyard.attach.initiator.connection_commands`,
task management, Text, NOP and Logout in :mod:`~blockyard.attach.initiator.connection_control`.
Its value types are in :mod:`~blockyard.attach.initiator.connection_types`, the ISID, LUN and
target-address helpers in :mod:`~blockyard.attach.initiator.addressing`; this module re-exports
the names imported from it.

Error model: any protocol fault, digest error, lost connection or failed keepalive fails the
whole connection (ErrorRecoveryLevel 0 recovers nothing in place); every outstanding command
then fails with :class:`PathFailedError`, which multipath re-issues on another path. A command
timeout aborts just that task (:class:`CommandTimeoutError`), and a TMF that goes unanswered
fails the connection. Every wait is bounded by a setting of :class:`InitiatorSettings`.

Not thread-safe: every method runs on the event loop that opened the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, cast

from blockyard.attach.initiator.addressing import encode_lun, parse_target_address, random_isid
from blockyard.attach.initiator.connection_commands import CommandPath
from blockyard.attach.initiator.connection_control import (
    MAX_SEND_TARGETS_TEXT_BYTES,
    MAX_TEXT_ROUNDS,
    SessionControl,
)
from blockyard.attach.initiator.connection_types import (
    _SN_MASK,
    CommandOutcome,
    InitiatorSettings,
    _broadcast,
    _retrieve,
    _Task,
)
from blockyard.attach.initiator.errors import (
    CommandRejectedError,
    PathFailedError,
)
from blockyard.blockdev import BytesLike
from blockyard.errors import BlockyardError
from blockyard.iscsi.discovery import DiscoveryTarget, Portal
from blockyard.iscsi.errors import IscsiError, RemoteProtocolError
from blockyard.iscsi.login import (
    LOGIN_MAX_DATA_SEGMENT_LENGTH,
    InitiatorLogin,
    InitiatorLoginSettings,
)
from blockyard.iscsi.negotiation import NegotiatedParameters
from blockyard.iscsi.pdu import (
    R2T,
    RESERVED_TAG,
    AsyncMessage,
    DataIn,
    LoginResponse,
    LogoutResponse,
    NopIn,
    Pdu,
    Reject,
    ScsiResponse,
    TaskManagementResponse,
    TextResponse,
    encode_pdu_buffers,
)
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole
from blockyard.iscsi.target_session import serial_lt
from blockyard.iscsi.text import TextAssembler

log = logging.getLogger("blockyard.attach.initiator")

#: Transport write buffer: past the high mark new commands wait until it drains.
WRITE_BUFFER_HIGH_BYTES = 8 << 20
WRITE_BUFFER_LOW_BYTES = 2 << 20


class IscsiConnection(CommandPath, SessionControl, asyncio.Protocol):
    """One connection = one session (MaxConnections=1) to one portal.

    Create with :meth:`open` (connects and logs in, bounded by the settings' timeouts). Then
    :meth:`execute` runs SCSI commands, many at once; :meth:`logout` ends the session cleanly
    and :meth:`abort` drops it. ``on_lost`` is called once, on the loop, when the connection
    fails (not after a clean logout).
    """

    def __init__(
        self,
        portal: Portal,
        settings: InitiatorSettings,
        *,
        target_name: str | None,
        isid: int,
        lun: int = 0,
        on_lost: Callable[[IscsiConnection, PathFailedError], None] | None = None,
    ) -> None:
        self.portal = portal
        self.settings = settings
        self.target_name = target_name
        self.isid = isid
        self.lun = lun
        self._lun_field = encode_lun(lun)
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = PduReader(
            peer=PeerRole.TARGET, max_data_segment_length=LOGIN_MAX_DATA_SEGMENT_LENGTH
        )
        self._login: InitiatorLogin | None = None
        self._login_done: asyncio.Future[None] = self._loop.create_future()
        self._login_done.add_done_callback(_retrieve)
        self._params = NegotiatedParameters()
        self._header_digest = False
        self._data_digest = False
        self._full_feature = False
        self._failed: PathFailedError | None = None
        self._closed = False
        self.draining = False
        self._cmd_sn = 0
        self._exp_stat_sn = 0
        self._max_cmd_sn = 0
        # Set (and dropped) when MaxCmdSN advances; created only when someone waits, since
        # nearly every response advances the window.
        self._window_changed: asyncio.Event | None = None
        self._writable = True
        self._writable_changed = asyncio.Event()
        # Command slots (queue_depth): a counter so the synchronous fast path can take one
        # without a coroutine; coroutine waiters park on a broadcast event.
        self._free_slots = settings.queue_depth
        self._slot_waiters = 0
        self._slot_freed = asyncio.Event()
        # PDUs encoded during one pass of the event loop go out in one write (one send()):
        # with many commands in flight this turns N syscalls into one.
        self._out: list[BytesLike] = []
        self._flush_scheduled = False
        # Fast-path tasks in start order, which is deadline order (one timeout for all): one
        # timer for the oldest instead of one per command.
        self._fast: dict[int, _Task] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._next_itt_value = 1
        self._tasks: dict[int, _Task] = {}
        self._waiters: dict[int, asyncio.Future[Pdu]] = {}
        self._text = TextAssembler(MAX_SEND_TARGETS_TEXT_BYTES)
        self._last_rx = self._loop.time()
        self._ping_itt: int | None = None
        self._ping_sent = 0.0
        self._keepalive: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ---- opening ------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        portal: Portal,
        settings: InitiatorSettings,
        *,
        target_name: str | None,
        isid: int | None = None,
        lun: int = 0,
        on_lost: Callable[[IscsiConnection, PathFailedError], None] | None = None,
    ) -> IscsiConnection:
        """Connect to ``portal`` and log in (a Discovery session when ``target_name`` is None).

        Raises :class:`PathFailedError` (cause chained) when the portal cannot be reached in
        ``connect_timeout_s`` or the login does not finish in ``login_timeout_s``; a login the
        target refuses raises it too, with the :class:`LoginRejectedError` or
        :class:`AuthenticationError` as the cause.
        """
        conn = cls(
            portal,
            settings,
            target_name=target_name,
            isid=random_isid() if isid is None else isid,
            lun=lun,
            on_lost=on_lost,
        )
        loop = asyncio.get_running_loop()
        where = f"{portal.host}:{portal.port}"
        try:
            async with asyncio.timeout(settings.connect_timeout_s):
                await loop.create_connection(lambda: conn, portal.host, portal.port)
        except (OSError, TimeoutError) as exc:
            raise PathFailedError(f"cannot connect to iSCSI portal {where}: {exc!r}") from exc
        try:
            login = InitiatorLogin(
                InitiatorLoginSettings(
                    initiator_name=settings.initiator_name,
                    isid=conn.isid,
                    target_name=target_name,
                    initiator_alias=settings.initiator_alias,
                    chap=settings.chap,
                    target_chap=settings.target_chap,
                    operational=settings.operational(),
                )
            )
            conn._login = login
            conn._send(login.start())
            async with asyncio.timeout(settings.login_timeout_s):
                await conn._login_done
        except TimeoutError as exc:
            conn.abort("login timed out")
            raise PathFailedError(
                f"login to {target_name or 'discovery'} at {where} did not finish within "
                f"{settings.login_timeout_s} s"
            ) from exc
        except IscsiError as exc:
            conn.abort(f"login failed: {exc}")
            raise PathFailedError(
                f"login to {target_name or 'discovery'} at {where} failed: {exc}"
            ) from exc
        conn._keepalive = loop.create_task(conn._keepalive_loop())
        return conn

    # ---- properties ---------------------------------------------------------------------

    @property
    def params(self) -> NegotiatedParameters:
        return self._params

    @property
    def alive(self) -> bool:
        return self._full_feature and self._failed is None and not self._closed

    @property
    def usable(self) -> bool:
        """Alive and not asked by the target to go away."""
        return self.alive and not self.draining

    @property
    def outstanding(self) -> int:
        return len(self._tasks)

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH_BYTES, WRITE_BUFFER_LOW_BYTES)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._last_rx = self._loop.time()
        self._reader.receive_data(data)
        while not self._closed:
            try:
                pdu = self._reader.next_pdu()
            except RemoteProtocolError as exc:
                # ERL 0 recovers nothing in place: drop the connection, re-issue elsewhere.
                self._fail(f"protocol error from the target: {exc}", exc)
                return
            if pdu is NEED_DATA:
                return
            try:
                self._dispatch(pdu)
            except BlockyardError as exc:
                self._fail(f"protocol error from the target: {exc}", exc)
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("connection closed by the target" if exc is None else f"connection lost: {exc}")

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._writable_changed = _broadcast(self._writable_changed)

    # ---- closing ------------------------------------------------------------------------

    def abort(self, reason: str) -> None:
        """Drop the connection now; outstanding commands fail with PathFailedError."""
        self._fail(reason)

    # ---- receive dispatch ---------------------------------------------------------------

    def _dispatch(self, pdu: Pdu) -> None:
        if not self._full_feature:
            self._on_login_pdu(pdu)
            return
        if isinstance(pdu, DataIn):
            self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
            self._on_data_in(pdu)
        elif isinstance(pdu, ScsiResponse):
            self._status_sn(pdu.stat_sn)
            self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
            self._on_response(pdu)
        elif isinstance(pdu, R2T):
            self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
            self._on_r2t(pdu)
        elif isinstance(pdu, NopIn):
            self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
            self._on_nop_in(pdu)
        elif isinstance(pdu, TaskManagementResponse | TextResponse | LogoutResponse):
            self._status_sn(pdu.stat_sn)
            self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
            self._resolve_waiter(pdu.itt, pdu)
        elif isinstance(pdu, Reject):
            self._status_sn(pdu.stat_sn)
            self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
            self._on_reject(pdu)
        elif isinstance(pdu, AsyncMessage):
            self._status_sn(pdu.stat_sn)
            self._window(pdu.exp_cmd_sn, pdu.max_cmd_sn)
            self._on_async(pdu)
        else:
            raise RemoteProtocolError(
                f"{type(pdu).__name__} is not valid in the Full Feature Phase", fatal=True
            )

    def _on_login_pdu(self, pdu: Pdu) -> None:
        login = self._login
        if login is None or self._login_done.done():
            raise RemoteProtocolError(f"unexpected {type(pdu).__name__} before login")
        if not isinstance(pdu, LoginResponse):
            raise RemoteProtocolError(f"{type(pdu).__name__} received during login", fatal=True)
        try:
            request = login.receive(pdu)
        except IscsiError as exc:
            self._login_done.set_exception(exc)
            self._close_quietly()
            return
        if request is not None:
            self._send(request)
            return
        result = login.result
        assert result is not None
        params = result.params
        self._params = params
        self._cmd_sn = result.cmd_sn
        self._exp_stat_sn = result.exp_stat_sn
        self._max_cmd_sn = result.max_cmd_sn
        # RFC 7143 §13.1: digests start with the first PDU after the final Login Response.
        self._header_digest = params.header_digest
        self._data_digest = params.data_digest
        self._reader.configure(
            max_data_segment_length=params.max_recv_data_segment_length,
            header_digest=params.header_digest,
            data_digest=params.data_digest,
        )
        self._full_feature = True
        self._login_done.set_result(None)

    def _on_reject(self, pdu: Reject) -> None:
        header = bytes(pdu.data)
        if len(header) < 20:
            return
        itt = int.from_bytes(header[16:20], "big")
        log.warning("target %s rejected a PDU (reason %#x, ITT %#x)", self._where(),
                    pdu.reason, itt)  # fmt: skip
        task = self._tasks.get(itt)
        error = CommandRejectedError(
            f"the target rejected the command with reason {pdu.reason:#x} (RFC 7143 §11.17.1)"
        )
        if task is not None and not task.future.done():
            task.future.set_exception(error)
            self._settled(task)
            return
        waiter = self._waiters.get(itt)
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _resolve_waiter(self, itt: int, pdu: Pdu) -> None:
        waiter = self._waiters.get(itt)
        if waiter is not None and not waiter.done():
            waiter.set_result(pdu)

    # ---- sequence numbers ---------------------------------------------------------------

    def _status_sn(self, stat_sn: int) -> None:
        following = (stat_sn + 1) & _SN_MASK
        if serial_lt(self._exp_stat_sn, following):
            self._exp_stat_sn = following

    def _window(self, exp_cmd_sn: int, max_cmd_sn: int) -> None:
        # RFC 7143 §4.2.2.1: MaxCmdSN < ExpCmdSN - 1 is invalid and ignored; values only
        # move forward.
        if serial_lt(max_cmd_sn, (exp_cmd_sn - 1) & _SN_MASK):
            return
        if serial_lt(self._max_cmd_sn, max_cmd_sn):
            self._max_cmd_sn = max_cmd_sn
            self._wake_window()

    def _window_event(self) -> asyncio.Event:
        event = self._window_changed
        if event is None:
            event = self._window_changed = asyncio.Event()
        return event

    def _wake_window(self) -> None:
        event = self._window_changed
        if event is not None:
            self._window_changed = None
            event.set()

    def _next_itt(self) -> int:
        for _ in range(len(self._tasks) + len(self._waiters) + 3):
            itt = self._next_itt_value
            self._next_itt_value = (itt + 1) & _SN_MASK
            if itt == RESERVED_TAG or itt in self._tasks or itt in self._waiters:
                continue
            if itt == self._ping_itt:
                continue
            return itt
        raise AssertionError("no free ITT although the queue depth bounds tasks")

    # ---- futures and background work ----------------------------------------------------

    def _new_future(self) -> asyncio.Future[Any]:
        # A failed connection fails every future, including ones whose waiter already gave
        # up (timeout, cancellation); retrieving the exception keeps asyncio from logging it.
        future: asyncio.Future[Any] = self._loop.create_future()
        future.add_done_callback(_retrieve)
        return future

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        background = self._loop.create_task(coro)
        self._background.add(background)
        background.add_done_callback(self._background.discard)

    # ---- output and failure -------------------------------------------------------------

    def _send(self, pdu: Pdu) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise self._failed or PathFailedError(f"{self._where()} is not connected")
        self._out.extend(
            encode_pdu_buffers(
                pdu, header_digest=self._header_digest, data_digest=self._data_digest
            )
        )
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write every PDU queued so far at once (bounded by queue_depth commands and their
        Data-Out; the transport's write buffer limits apply after). Runs by itself at the
        end of the loop pass; callers that queued a batch call it to save that pass."""
        out = self._out
        if not out:
            return
        self._out = []
        transport = self._transport
        if out and transport is not None and not transport.is_closing():
            transport.write(b"".join(out))

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed or not self._full_feature:
            raise PathFailedError(f"{self._where()} is closed")
        if self.draining:
            raise PathFailedError(f"{self._where()} is being logged out")

    def _where(self) -> str:
        return f"{self.target_name or 'discovery'} via {self.portal.host}:{self.portal.port}"

    def _close_quietly(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        self._wake_all(PathFailedError(f"{self._where()} was logged out"))

    def _fail(self, reason: str, cause: BaseException | None = None) -> None:
        if self._failed is not None:
            return
        error = PathFailedError(f"iSCSI connection {self._where()} failed: {reason}")
        if cause is not None:
            error.__cause__ = cause
        self._failed = error
        was_closed = self._closed
        self._closed = True
        if self._transport is not None:
            self._transport.abort()
        if not self._login_done.done():
            self._login_done.set_exception(error)
        self._wake_all(error)
        if not was_closed:
            log.warning("%s", error)
            if self._on_lost is not None and self._full_feature:
                self._on_lost(self, error)

    def _wake_all(self, error: PathFailedError) -> None:
        for task in list(self._tasks.values()):
            if not task.future.done():
                task.future.set_exception(error)
                self._settled(task)
        for waiter in list(self._waiters.values()):
            if not waiter.done():
                waiter.set_exception(error)
        self._wake_window()
        self._writable_changed = _broadcast(self._writable_changed)
        self._slot_freed = _broadcast(self._slot_freed)
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()


async def discover(
    portal: Portal, settings: InitiatorSettings, *, value: str = "All"
) -> list[DiscoveryTarget]:
    """SendTargets discovery (RFC 7143 Appendix C) at ``portal``: log in to a Discovery session,
    ask, log out. Bounded by the settings' connect, login, command and logout timeouts."""
    conn = await IscsiConnection.open(portal, settings, target_name=None)
    try:
        return await conn.send_targets(value)
    finally:
        await conn.logout()


__all__ = [
    "MAX_SEND_TARGETS_TEXT_BYTES",
    "MAX_TEXT_ROUNDS",
    "CommandOutcome",
    "InitiatorSettings",
    "IscsiConnection",
    "discover",
    "encode_lun",
    "parse_target_address",
    "random_isid",
]
