"""One initiator-side iSCSI connection and its single-connection session, on asyncio.

The byte work is the sans-IO core's: :class:`~blockyard.iscsi.reader.PduReader` frames the
target's PDUs, :func:`~blockyard.iscsi.pdu.encode_pdu_buffers` encodes ours, and
:class:`~blockyard.iscsi.login.InitiatorLogin` drives the login. This module only adds what a
session needs on top: the CmdSN window (RFC 7143 §4.2.2.1), ITTs, Data-In reassembly into the
caller's buffer, immediate/unsolicited data and R2T answers (RFC 7143 §11.8), NOP keepalive
both ways (§11.18, §11.19), ABORT TASK on a command timeout (§11.5), Logout (§11.14) and
SendTargets discovery (Appendix C).

Error model: any protocol fault, digest error, lost connection or failed keepalive fails the
whole connection (ErrorRecoveryLevel 0 recovers nothing in place); every outstanding command
then fails with :class:`PathFailedError`, which multipath re-issues on another path. A command
timeout aborts just that task (:class:`CommandTimeoutError`), and a TMF that goes unanswered
fails the connection. Every wait is bounded by a setting of :class:`InitiatorSettings`.

Not thread-safe: every method runs on the event loop that opened the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, cast

from blockyard.attach.initiator.errors import (
    CommandRejectedError,
    CommandTimeoutError,
    PathFailedError,
)
from blockyard.attach.initiator.scsi import Sense, parse_sense
from blockyard.blockdev import BytesLike
from blockyard.errors import BlockyardError
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.discovery import DEFAULT_PORT, DiscoveryTarget, Portal
from blockyard.iscsi.errors import IscsiError, RemoteProtocolError
from blockyard.iscsi.login import (
    LOGIN_MAX_DATA_SEGMENT_LENGTH,
    InitiatorLogin,
    InitiatorLoginSettings,
)
from blockyard.iscsi.negotiation import (
    DIGEST_CRC32C,
    DIGEST_NONE,
    NegotiatedParameters,
    OperationalSettings,
)
from blockyard.iscsi.pdu import (
    R2T,
    RESERVED_TAG,
    AsyncEvent,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginResponse,
    LogoutReason,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    Reject,
    ScsiCommand,
    ScsiResponse,
    ScsiResponseCode,
    TaskManagementFunction,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    encode_pdu_buffers,
    parse_sense_segment,
)
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole
from blockyard.iscsi.target_session import serial_le, serial_lt
from blockyard.iscsi.text import TextAssembler, encode_text, parse_text

log = logging.getLogger("blockyard.attach.initiator")

_SN_MASK = 0xFFFFFFFF  # RFC 7143 §4.2.2.1: 32-bit serial numbers
#: RFC 7143 §11.12.5: ISID type 10b ("random") in the top two bits of the 6-byte ISID.
_ISID_TYPE_RANDOM = 0b10 << 46
#: Bound on SendTargets text gathered over continued Text Responses (RFC 7143 §6.1 asks for
#: at least 8192; a large cluster's answer stays far below this).
MAX_SEND_TARGETS_TEXT_BYTES = 1 << 20
#: Bound on Text Request/Response rounds of one SendTargets exchange.
MAX_TEXT_ROUNDS = 256
#: Transport write buffer: past the high mark new commands wait until it drains.
WRITE_BUFFER_HIGH_BYTES = 8 << 20
WRITE_BUFFER_LOW_BYTES = 2 << 20


def random_isid() -> int:
    """A random-type ISID (RFC 7143 §11.12.5): each path gets its own I_T nexus."""
    return _ISID_TYPE_RANDOM | int.from_bytes(os.urandom(6), "big") & ((1 << 46) - 1)


def encode_lun(lun: int) -> int:
    """The 8-byte LUN field for ``lun``: peripheral addressing below 256, flat space up to
    16383 (SAM-5 §4.7.7)."""
    if not 0 <= lun <= 0x3FFF:
        raise ValueError(f"LUN {lun} is outside 0..16383")
    if lun < 256:
        return lun << 48
    return (0x4000 | lun) << 48


@dataclass(frozen=True, slots=True)
class InitiatorSettings:
    """How the initiator logs in and how long it waits. All times in seconds.

    ``initiator_name`` is our IQN; ``chap`` our CHAP credentials, ``target_chap`` what the
    target must prove (mutual CHAP). Digests are requested (CRC32C preferred, None accepted)
    when the flags are set. ``queue_depth`` bounds commands outstanding per connection (the
    target's CmdSN window bounds them too). ``command_timeout_s`` is per command attempt.
    """

    initiator_name: str
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None
    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1 << 20
    first_burst_length: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = False
    queue_depth: int = 64
    connect_timeout_s: float = 5.0
    login_timeout_s: float = 10.0
    command_timeout_s: float = 30.0
    tmf_timeout_s: float = 5.0
    logout_timeout_s: float = 5.0
    nop_interval_s: float = 5.0
    nop_timeout_s: float = 10.0
    initiator_alias: str = ""

    def __post_init__(self) -> None:
        if self.queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        timers = (
            self.connect_timeout_s,
            self.login_timeout_s,
            self.command_timeout_s,
            self.tmf_timeout_s,
            self.logout_timeout_s,
            self.nop_interval_s,
            self.nop_timeout_s,
        )
        if min(timers) <= 0:
            raise ValueError("every timeout and interval must be positive")

    def operational(self) -> OperationalSettings:
        def digests(on: bool) -> tuple[str, ...]:
            return (DIGEST_CRC32C, DIGEST_NONE) if on else (DIGEST_NONE,)

        return OperationalSettings(
            header_digests=digests(self.header_digest),
            data_digests=digests(self.data_digest),
            initial_r2t=self.initial_r2t,
            immediate_data=self.immediate_data,
            max_recv_data_segment_length=self.max_recv_data_segment_length,
            max_burst_length=self.max_burst_length,
            first_burst_length=min(self.first_burst_length, self.max_burst_length),
        )


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """A command the target completed. ``data`` holds Data-In when the caller gave no buffer;
    ``transferred`` counts Data-In bytes placed (in ``data`` or the caller's buffer)."""

    status: int
    sense: Sense | None
    data: bytes = b""
    transferred: int = 0


@dataclass(slots=True, eq=False)
class _Task:
    itt: int
    cmd_sn: int
    lun: int
    buffer: memoryview | None
    data_out: memoryview | None
    future: asyncio.Future[CommandOutcome]
    owns_buffer: bool = False
    received: int = 0
    aborting: bool = False
    #: Fast-path tasks (:meth:`IscsiConnection.start_command`): called synchronously when the
    #: task ends (not after a timeout or cancellation), and when its deadline passes.
    on_done: Callable[[_Task], None] | None = None
    on_timeout: Callable[[_Task], None] | None = None
    deadline: float = 0.0


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _broadcast(event: asyncio.Event) -> asyncio.Event:
    """Wake everyone waiting on ``event`` and return a fresh one for the next change."""
    event.set()
    return asyncio.Event()


def parse_target_address(text: str) -> Portal:
    """``host[:port][,tpgt]`` with IPv6 literals bracketed (RFC 7143 §13.8)."""
    address, _, tag = text.partition(",")
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = address.rpartition(":") if ":" in address else (address, "", "")
    port = int(port_text) if port_text.isdigit() else DEFAULT_PORT
    tpgt = int(tag) if tag.isdigit() else 1
    return Portal(host, port, tpgt)


class IscsiConnection(asyncio.Protocol):
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

    # ---- commands -----------------------------------------------------------------------

    async def execute(
        self,
        cdb: bytes,
        *,
        data_out: BytesLike | None = None,
        read_length: int = 0,
        read_into: memoryview | None = None,
        timeout_s: float | None = None,
    ) -> CommandOutcome:
        """Run one SCSI command and return the target's status, sense and Data-In.

        Data-In lands in ``read_into`` when given (its length is the expected length), else in
        a fresh buffer of ``read_length`` bytes returned as ``data``. Waits for a queue slot
        and the CmdSN window within the same ``timeout_s`` (default ``command_timeout_s``).
        Raises :class:`CommandTimeoutError` after aborting the task on timeout, and
        :class:`PathFailedError` when the connection is or becomes unusable.
        """
        timeout = self.settings.command_timeout_s if timeout_s is None else timeout_s
        deadline = self._loop.time() + timeout
        self._check_alive()
        if self._free_slots <= 0 or self._slot_waiters:
            self._slot_waiters += 1
            try:
                async with asyncio.timeout_at(deadline):
                    while self._free_slots <= 0:
                        self._check_alive()
                        await self._slot_freed.wait()
            except TimeoutError as exc:
                raise CommandTimeoutError(
                    f"no command slot free on {self._where()} within {timeout} s"
                ) from exc
            finally:
                self._slot_waiters -= 1
        self._free_slots -= 1
        try:
            return await self._execute(cdb, data_out, read_length, read_into, deadline, timeout)
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        self._free_slots += 1
        if self._slot_waiters:
            self._slot_freed = _broadcast(self._slot_freed)

    def start_command(
        self,
        cdb: bytes,
        data_out: memoryview | None,
        read_length: int,
        read_into: memoryview | None,
        on_done: Callable[[_Task], None],
        on_timeout: Callable[[_Task], None],
    ) -> _Task | None:
        """The synchronous fast path of :meth:`execute`: send the command now if a queue slot
        is free, the CmdSN window is open and the transport takes data; else return None (the
        caller then uses :meth:`execute`, which waits for those). Raises PathFailedError when
        the connection is unusable.

        When the task ends, its slot and ITT are released and ``on_done(task)`` is called on
        the loop, synchronously, with ``task.future`` done (outcome, or PathFailedError /
        CommandRejectedError / cancelled). After ``command_timeout_s`` without an answer,
        ``on_timeout(task)`` is called instead and ``on_done`` never: the caller must then
        :meth:`abort_timed_out` the task. ``data_out`` must be a flat byte view.
        """
        self._check_alive()
        if (
            self._free_slots <= 0
            or self._slot_waiters
            or not self._writable
            or not serial_le(self._cmd_sn, self._max_cmd_sn)
        ):
            return None
        self._free_slots -= 1
        out = data_out if data_out is not None and data_out.nbytes else None
        owns = False
        buffer = read_into
        if buffer is None and read_length:
            buffer = memoryview(bytearray(read_length))
            owns = True
        loop = self._loop
        task = _Task(
            self._next_itt(), self._cmd_sn, self._lun_field, buffer, out, loop.create_future(),
            owns, 0, False, on_done, on_timeout, loop.time() + self.settings.command_timeout_s,
        )  # fmt: skip
        self._cmd_sn = (self._cmd_sn + 1) & _SN_MASK
        self._tasks[task.itt] = task
        self._fast[task.itt] = task
        if self._sweeper is None:
            self._sweeper = loop.call_at(task.deadline, self._sweep)
        try:
            self._send_command(task, cdb)
        except PathFailedError:
            # The transport is going away (a failure is being reported): undo, the caller
            # takes the slow path, which sees the failed connection.
            task.on_done = None
            task.future.cancel()
            self._fast.pop(task.itt, None)
            self._tasks.pop(task.itt, None)
            self._release_slot()
            raise
        return task

    def _settled(self, task: _Task) -> None:
        """``task.future`` was just resolved: finish a fast-path task (release its slot and
        ITT unless an abort owns them, then tell its owner)."""
        on_done = task.on_done
        if on_done is None:
            return
        task.on_done = None
        _retrieve(task.future)
        if task.aborting:
            return  # the abort releases the ITT and the slot
        self._fast.pop(task.itt, None)
        self._tasks.pop(task.itt, None)
        self._release_slot()
        on_done(task)

    def _sweep(self) -> None:
        """Fire the timeouts of fast-path tasks whose deadline passed; re-arm for the next."""
        self._sweeper = None
        now = self._loop.time()
        expired: list[_Task] = []
        for task in self._fast.values():
            if task.deadline > now:
                self._sweeper = self._loop.call_at(task.deadline, self._sweep)
                break
            expired.append(task)
        for task in expired:
            del self._fast[task.itt]
            on_timeout = task.on_timeout
            if task.future.done() or task.aborting or on_timeout is None:
                continue
            # From here on the ITT stays reserved until the target has let go of the task.
            task.aborting = True
            on_timeout(task)

    async def abort_timed_out(self, task: _Task) -> CommandOutcome:
        """ABORT TASK for a fast-path task whose timer fired; always raises
        (CommandTimeoutError, or PathFailedError when the abort is not answered)."""
        try:
            return await self._abort_task(task, self.settings.command_timeout_s)
        finally:
            self._release_slot()

    def cancel_command(self, task: _Task) -> None:
        """The caller gave up on a fast-path task: abort it in the background; its ITT and
        buffer are released only once the target has let go of it."""
        if task.future.done() or task.aborting:
            return
        task.aborting = True
        self._fast.pop(task.itt, None)
        self._spawn(self._abort_fast_quietly(task))

    async def _abort_fast_quietly(self, task: _Task) -> None:
        try:
            await self._abort_quietly(task)
        finally:
            self._release_slot()

    async def _execute(
        self,
        cdb: bytes,
        data_out: BytesLike | None,
        read_length: int,
        read_into: memoryview | None,
        deadline: float,
        timeout: float,
    ) -> CommandOutcome:
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    self._check_alive()
                    if self._writable and serial_le(self._cmd_sn, self._max_cmd_sn):
                        break
                    wait_for = self._window_event() if self._writable else self._writable_changed
                    await wait_for.wait()
        except TimeoutError as exc:
            raise CommandTimeoutError(
                f"the CmdSN window of {self._where()} stayed closed for {timeout} s"
            ) from exc
        out = None
        if data_out is not None and len(data_out):
            out = data_out if isinstance(data_out, memoryview) else memoryview(data_out)
            out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        owns = False
        buffer = read_into
        if buffer is None and read_length:
            buffer = memoryview(bytearray(read_length))
            owns = True
        task = _Task(
            itt=self._next_itt(),
            cmd_sn=self._cmd_sn,
            lun=self._lun_field,
            buffer=buffer,
            data_out=out,
            future=self._new_future(),
            owns_buffer=owns,
        )
        self._cmd_sn = (self._cmd_sn + 1) & _SN_MASK
        self._tasks[task.itt] = task
        self._send_command(task, cdb)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task.future)
        except TimeoutError:
            return await self._abort_task(task, timeout)
        except asyncio.CancelledError:
            if not task.future.done():
                # The caller gave up: abort in the background so the ITT (and the caller's
                # buffer) is released only once the target has let go of the task.
                task.aborting = True
                self._spawn(self._abort_quietly(task))
            raise
        finally:
            if task.future.done() and not task.aborting:
                self._tasks.pop(task.itt, None)

    def _send_command(self, task: _Task, cdb: bytes) -> None:
        params = self._params
        out = task.data_out
        edtl = task.buffer.nbytes if task.buffer is not None else (out.nbytes if out else 0)
        immediate: BytesLike = b""
        unsolicited_end = 0
        if out is not None:
            first_burst = min(params.first_burst_length, out.nbytes)
            if params.immediate_data:
                immediate_len = min(first_burst, params.max_xmit_data_segment_length)
                immediate = out[:immediate_len]
                unsolicited_end = immediate_len
            if not params.initial_r2t:
                unsolicited_end = first_burst
        immediate_len = len(immediate)
        more_unsolicited = unsolicited_end > immediate_len
        self._send(
            ScsiCommand(
                itt=task.itt,
                cdb=cdb,
                lun=task.lun,
                expected_data_transfer_length=edtl,
                cmd_sn=task.cmd_sn,
                exp_stat_sn=self._exp_stat_sn,
                final=not more_unsolicited,
                read=task.buffer is not None,
                write=out is not None,
                data=immediate,
            )
        )
        if out is not None and more_unsolicited:
            # RFC 7143 §11.7: unsolicited Data-Out uses TTT 0xffffffff, up to FirstBurstLength.
            self._send_data_out(task, out, RESERVED_TAG, immediate_len, unsolicited_end)

    def _send_data_out(self, task: _Task, out: memoryview, ttt: int, start: int, end: int) -> None:
        step = self._params.max_xmit_data_segment_length
        data_sn = 0
        offset = start
        while offset < end:
            length = min(step, end - offset)
            self._send(
                DataOut(
                    itt=task.itt,
                    ttt=ttt,
                    lun=task.lun,
                    exp_stat_sn=self._exp_stat_sn,
                    data_sn=data_sn,
                    buffer_offset=offset,
                    final=offset + length >= end,
                    data=out[offset : offset + length],
                )
            )
            data_sn += 1
            offset += length

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

    async def _abort_quietly(self, task: _Task) -> None:
        with contextlib.suppress(BlockyardError):
            await self._abort_task(task, 0.0)

    async def _abort_task(self, task: _Task, timeout: float) -> CommandOutcome:
        """ABORT TASK (RFC 7143 §11.5.1) for a timed-out command. The ITT stays reserved until
        the target answers, so a late Data-In can never land in a reused task's buffer."""
        task.aborting = True
        try:
            if not self.alive:
                raise self._failed or PathFailedError(f"{self._where()} is closed")
            itt = self._next_itt()
            waiter: asyncio.Future[Pdu] = self._new_future()
            self._waiters[itt] = waiter
            self._send(
                TaskManagementRequest(
                    itt=itt,
                    function=TaskManagementFunction.ABORT_TASK,
                    lun=task.lun,
                    referenced_task_tag=task.itt,
                    cmd_sn=self._cmd_sn,
                    exp_stat_sn=self._exp_stat_sn,
                    ref_cmd_sn=task.cmd_sn,
                    immediate=True,
                )
            )
            try:
                async with asyncio.timeout(self.settings.tmf_timeout_s):
                    response = await waiter
            except TimeoutError:
                self._fail(
                    f"ABORT TASK for ITT {task.itt:#x} got no answer within "
                    f"{self.settings.tmf_timeout_s} s"
                )
                raise self._failed or PathFailedError("connection failed") from None
            finally:
                self._waiters.pop(itt, None)
            code = response.response if isinstance(response, TaskManagementResponse) else -1
            log.warning(
                "command ITT %#x on %s timed out after %.1f s; ABORT TASK answered %s",
                task.itt,
                self._where(),
                timeout,
                code,
            )
            raise CommandTimeoutError(
                f"command timed out after {timeout} s on {self._where()} and was aborted"
            )
        finally:
            self._tasks.pop(task.itt, None)
            if not task.future.done():
                task.future.cancel()

    # ---- text, NOP, logout --------------------------------------------------------------

    async def send_targets(self, value: str = "All") -> list[DiscoveryTarget]:
        """SendTargets (RFC 7143 Appendix C) over this session; continued responses are
        gathered up to MAX_SEND_TARGETS_TEXT_BYTES."""
        itt = self._next_itt()
        ttt = RESERVED_TAG
        data = encode_text([("SendTargets", value)])
        text: bytes | None = None
        for _ in range(MAX_TEXT_ROUNDS):
            request = TextRequest(itt=itt, ttt=ttt, data=data)
            response = await self._numbered_request(request, itt)
            if not isinstance(response, TextResponse):
                raise PathFailedError(f"expected a Text Response, got {type(response).__name__}")
            text = self._text.add(response.data, cont=response.cont)
            if text is not None and response.final:
                break
            # RFC 7143 §11.10.4: ask for the rest with an empty request carrying the TTT.
            ttt = response.ttt
            data = b""
        if text is None:
            raise PathFailedError("SendTargets answer did not end within the round bound")
        targets: list[DiscoveryTarget] = []
        name: str | None = None
        portals: list[Portal] = []
        for key, val in parse_text(text):
            if key == "TargetName":
                if name is not None:
                    targets.append(DiscoveryTarget(name, tuple(portals)))
                name, portals = val, []
            elif key == "TargetAddress" and name is not None:
                portals.append(parse_target_address(val))
        if name is not None:
            targets.append(DiscoveryTarget(name, tuple(portals)))
        return targets

    async def _numbered_request(self, request: TextRequest, itt: int) -> Pdu:
        """Send a non-immediate request that takes a CmdSN and wait for its answer."""
        timeout = self.settings.command_timeout_s
        waiter: asyncio.Future[Pdu] = self._new_future()
        self._waiters[itt] = waiter
        try:
            async with asyncio.timeout(timeout):
                while not serial_le(self._cmd_sn, self._max_cmd_sn):
                    self._check_alive()
                    await self._window_event().wait()
                self._check_alive()
                pdu = replace(request, cmd_sn=self._cmd_sn, exp_stat_sn=self._exp_stat_sn)
                self._cmd_sn = (self._cmd_sn + 1) & _SN_MASK
                self._send(pdu)
                return await waiter
        except TimeoutError as exc:
            self._fail(f"no answer to a text request within {timeout} s")
            raise CommandTimeoutError(f"{self._where()}: text request timed out") from exc
        finally:
            self._waiters.pop(itt, None)

    async def ping(self) -> None:
        """NOP-Out with a reply wanted (RFC 7143 §11.18); raises PathFailedError when the
        answer does not come within ``nop_timeout_s`` (and fails the connection)."""
        self._check_alive()
        itt = self._next_itt()
        waiter: asyncio.Future[Pdu] = self._new_future()
        self._waiters[itt] = waiter
        try:
            self._send_ping(itt)
            async with asyncio.timeout(self.settings.nop_timeout_s):
                await waiter
        except TimeoutError as exc:
            self._fail(f"no NOP-In within {self.settings.nop_timeout_s} s")
            raise self._failed or PathFailedError("ping timed out") from exc
        finally:
            self._waiters.pop(itt, None)

    def _send_ping(self, itt: int) -> None:
        self._send(
            NopOut(
                itt=itt,
                ttt=RESERVED_TAG,
                cmd_sn=self._cmd_sn,
                exp_stat_sn=self._exp_stat_sn,
                lun=0,
                immediate=True,
            )
        )

    async def _keepalive_loop(self) -> None:
        """Ping when the link has been quiet for ``nop_interval_s``; fail the connection when a
        ping stays unanswered for ``nop_timeout_s``. Runs until the connection ends."""
        interval = self.settings.nop_interval_s
        tick = min(1.0, interval / 2)
        while self.alive:
            await asyncio.sleep(tick)
            now = self._loop.time()
            if self._ping_itt is not None:
                if now - self._ping_sent > self.settings.nop_timeout_s:
                    self._fail(
                        f"no answer to a NOP-Out within {self.settings.nop_timeout_s} s; "
                        "the target is unreachable"
                    )
                continue
            if now - self._last_rx >= interval and self.alive:
                self._ping_itt = self._next_itt()
                self._ping_sent = now
                self._send_ping(self._ping_itt)

    async def logout(self) -> None:
        """Logout (close the session, RFC 7143 §11.14) and close, within
        ``logout_timeout_s``. Never raises: a target that does not answer is just dropped."""
        if not self.alive:
            self.abort("logout of a dead connection")
            return
        itt = self._next_itt()
        waiter: asyncio.Future[Pdu] = self._new_future()
        self._waiters[itt] = waiter
        self.draining = True
        try:
            self._send(
                LogoutRequest(
                    itt=itt,
                    reason=LogoutReason.CLOSE_SESSION,
                    cid=0,
                    cmd_sn=self._cmd_sn,
                    exp_stat_sn=self._exp_stat_sn,
                    immediate=True,
                )
            )
            async with asyncio.timeout(self.settings.logout_timeout_s):
                await waiter
        except (TimeoutError, PathFailedError) as exc:
            log.info("logout from %s did not complete cleanly: %r", self._where(), exc)
        finally:
            self._waiters.pop(itt, None)
            self._close_quietly()

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

    def _on_data_in(self, pdu: DataIn) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None or task.aborting:
            return  # an aborted task's straggler: its buffer may already be the caller's again
        data = pdu.data
        length = len(data)
        buffer = task.buffer
        offset = pdu.buffer_offset
        if length:
            if buffer is None or offset + length > buffer.nbytes:
                raise RemoteProtocolError(
                    f"Data-In for ITT {pdu.itt:#x} at offset {offset} (+{length}) overruns the "
                    "expected transfer length (RFC 7143 §11.7.2)",
                    fatal=True,
                )
            buffer[offset : offset + length] = data
            task.received += length
        if pdu.status_present:
            self._status_sn(pdu.stat_sn)
            self._complete(task, pdu.status, None)

    def _on_response(self, pdu: ScsiResponse) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None:
            return
        if pdu.response != ScsiResponseCode.COMMAND_COMPLETED_AT_TARGET:
            # RFC 7143 §11.4.3: the target failed the command as a transport; re-issue.
            if not task.future.done():
                task.future.set_exception(
                    PathFailedError(f"target failure response {pdu.response:#x} on a command")
                )
                self._settled(task)
            return
        sense = parse_sense(parse_sense_segment(pdu.data)) if len(pdu.data) else None
        self._complete(task, pdu.status, sense)

    def _complete(self, task: _Task, status: int, sense: Sense | None) -> None:
        if task.future.done():
            return
        data = b""
        if task.owns_buffer and task.buffer is not None:
            data = bytes(task.buffer[: task.received])
        task.future.set_result(CommandOutcome(status, sense, data, task.received))
        self._settled(task)

    def _on_r2t(self, pdu: R2T) -> None:
        task = self._tasks.get(pdu.itt)
        if task is None or task.aborting:
            return
        out = task.data_out
        end = pdu.buffer_offset + pdu.desired_data_transfer_length
        if out is None or end > out.nbytes or pdu.desired_data_transfer_length == 0:
            raise RemoteProtocolError(
                f"R2T for ITT {pdu.itt:#x} asks for bytes {pdu.buffer_offset}..{end} the "
                "command does not have (RFC 7143 §11.8.4)",
                fatal=True,
            )
        self._send_data_out(task, out, pdu.ttt, pdu.buffer_offset, end)

    def _on_nop_in(self, pdu: NopIn) -> None:
        if pdu.itt == RESERVED_TAG:
            if pdu.ttt != RESERVED_TAG:
                # RFC 7143 §11.18: answer a target ping with its TTT, ITT 0xffffffff.
                self._send(
                    NopOut(
                        itt=RESERVED_TAG,
                        ttt=pdu.ttt,
                        cmd_sn=self._cmd_sn,
                        exp_stat_sn=self._exp_stat_sn,
                        lun=pdu.lun,
                        immediate=True,
                    )
                )
            return
        self._status_sn(pdu.stat_sn)
        if pdu.itt == self._ping_itt:
            self._ping_itt = None
            return
        self._resolve_waiter(pdu.itt, pdu)

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

    def _on_async(self, pdu: AsyncMessage) -> None:
        if pdu.async_event in (
            AsyncEvent.LOGOUT_REQUESTED,
            AsyncEvent.CONNECTION_WILL_DROP,
            AsyncEvent.SESSION_WILL_DROP,
        ):
            # RFC 7143 §11.9.1: stop sending new work here; multipath moves to another path
            # and reconnects this one once it is gone.
            log.info("target %s asked us to leave (async event %d)", self._where(),
                     pdu.async_event)  # fmt: skip
            self.draining = True
            if pdu.async_event == AsyncEvent.LOGOUT_REQUESTED:
                self._spawn(self._logout_when_idle(pdu.parameter3))

    async def _logout_when_idle(self, time_to_logout_s: int) -> None:
        # RFC 7143 §11.9.1: Parameter3 is the time the target allows before it logs us out.
        deadline = self._loop.time() + max(1, min(time_to_logout_s, 60))
        while self._tasks and self._loop.time() < deadline and self.alive:
            await asyncio.sleep(0.05)
        await self.logout()
        self._fail("logged out at the target's request")

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
    "CommandOutcome",
    "InitiatorSettings",
    "IscsiConnection",
    "discover",
    "encode_lun",
    "parse_target_address",
    "random_isid",
]
