"""Multipath with ALUA over several portals exporting one logical unit (asyncio).

Every portal given is a path: one :class:`IscsiConnection` (its own session and I_T nexus).
At start every path is logged in and probed; VPD page 83h must report the same NAA
identifier through all of them (else :class:`PathIdentityError`: they are different volumes and
merging them would corrupt both). Each path learns its target port group from the same page,
and REPORT TARGET PORT GROUPS, asked through that path, gives the group's access state
(SPC-4 §5.15). I/O goes to an active/optimized path (active/non-optimized when none), the
least busy one when several qualify.

Failover without failing the I/O:

- a path fails (connection drop, keepalive or command timeout, protocol error): the command is
  re-issued on another usable path and the lost path reconnects in the background with
  exponential backoff;
- an ALUA answer (NOT READY 04/0A transitioning, 04/0B standby, 04/0C unavailable) or a unit
  attention saying the states changed: REPORT TARGET PORT GROUPS is re-read on the live paths
  and the command is re-issued on the path that is now active;
- no usable path: the command waits for one, polling the ALUA states, for at most
  ``replacement_timeout_s`` after the last usable path went away (open-iscsi's
  ``replacement_timeout``), then fails with :class:`NoPathError`; later commands fail at once
  until a path is back.

Bound: a command that keeps meeting trouble (transient status, failover, lost paths) stops
after ``replacement_timeout_s`` of it, so nothing waits forever. Re-issuing is safe because
READ/WRITE/UNMAP/WRITE SAME/SYNCHRONIZE CACHE are idempotent at block level; a caller must not
have two overlapping writes in flight at once (the same rule the kernel block layer follows).

Not thread-safe: runs on one event loop; :class:`~blockyard.attach.initiator.blockdev.
IscsiBlockDevice` is the thread-safe facade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from blockyard.attach.initiator import scsi
from blockyard.attach.initiator.connection import (
    CommandOutcome,
    InitiatorSettings,
    IscsiConnection,
    random_isid,
)
from blockyard.attach.initiator.connection_types import _Task
from blockyard.attach.initiator.errors import (
    CommandRejectedError,
    NoPathError,
    PathFailedError,
    PathIdentityError,
)
from blockyard.attach.initiator.scsi import Disposition
from blockyard.blockdev import BytesLike
from blockyard.errors import BlockyardError
from blockyard.iscsi.discovery import Portal
from blockyard.scsi.alua import AccessState
from blockyard.scsi.constants import (
    CAPACITY_DATA_HAS_CHANGED,
    LU_NOT_ACCESSIBLE_STANDBY,
    LU_NOT_ACCESSIBLE_TRANSITION,
    Status,
)

log = logging.getLogger("blockyard.attach.initiator.multipath")

#: open-iscsi's default ``node.session.timeo.replacement_timeout`` (iscsid.conf).
DEFAULT_REPLACEMENT_TIMEOUT_S = 120.0
#: Probe commands at path start (TEST UNIT READY, INQUIRY, RTPG) get this much time each.
PROBE_TIMEOUT_S = 10.0
#: Unit attentions are consumed one per command (SAM-5 §5.14): a fresh nexus can hold several.
PROBE_UNIT_ATTENTIONS_MAX = 16
#: I/O may use these ALUA states (SPC-4 §5.15.2.4); lower rank is preferred.
_STATE_RANK = {AccessState.ACTIVE_OPTIMIZED: 0, AccessState.ACTIVE_NON_OPTIMIZED: 1}
_UNKNOWN_STATE_RANK = 2


@dataclass(frozen=True, slots=True)
class MultipathSettings:
    """Failover policy. Times in seconds.

    ``replacement_timeout_s``: how long I/O waits for a usable path before failing with EIO.
    ``reconnect_backoff_*``: delay between reconnect attempts of a lost path, doubling from
    initial to max. ``retry_delay_s``: pause before re-issuing after BUSY, a unit attention or
    a transitioning port. ``alua_poll_s``: how often ALUA states are re-read while no path is
    usable.
    """

    replacement_timeout_s: float = DEFAULT_REPLACEMENT_TIMEOUT_S
    reconnect_backoff_initial_s: float = 0.2
    reconnect_backoff_max_s: float = 5.0
    retry_delay_s: float = 0.02
    alua_poll_s: float = 0.25

    def __post_init__(self) -> None:
        if self.replacement_timeout_s < 0:
            raise ValueError("replacement_timeout_s must not be negative")
        if min(self.reconnect_backoff_initial_s, self.alua_poll_s) <= 0:
            raise ValueError("backoff and poll intervals must be positive")
        if self.reconnect_backoff_max_s < self.reconnect_backoff_initial_s:
            raise ValueError("reconnect_backoff_max_s must be >= reconnect_backoff_initial_s")


@dataclass(slots=True, eq=False)
class _Path:
    portal: Portal
    isid: int
    conn: IscsiConnection | None = None
    group_id: int | None = None
    relative_port: int | None = None
    state: AccessState | int | None = None
    last_error: str = ""
    reconnecting: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.portal.host}:{self.portal.port}"

    @property
    def rank(self) -> int | None:
        """Preference for I/O, None when the path cannot take I/O now."""
        if self.conn is None or not self.conn.usable:
            return None
        if self.state is None:
            return _UNKNOWN_STATE_RANK
        return _STATE_RANK.get(AccessState(self.state)) if self.state in _STATE_RANK else None


#: What :meth:`MultipathSession.submit` reports: exactly one of outcome / error is set.
Completion = Callable[[CommandOutcome | None, BaseException | None], None]


class Submission:
    """One command started by :meth:`MultipathSession.submit`. Loop thread only."""

    __slots__ = (
        "cancelled",
        "cdb",
        "command",
        "conn",
        "data_out",
        "done",
        "finished",
        "lba",
        "path",
        "read_into",
        "read_length",
        "task",
        "worker",
    )

    def __init__(
        self,
        cdb: bytes,
        done: Completion,
        command: str,
        lba: int | None,
        data_out: memoryview | None,
        read_length: int,
        read_into: memoryview | None,
    ) -> None:
        self.cdb = cdb
        self.done = done
        self.command = command
        self.lba = lba
        self.data_out = data_out
        self.read_length = read_length
        self.read_into = read_into
        self.path: _Path | None = None
        self.conn: IscsiConnection | None = None
        self.task: _Task | None = None
        self.worker: asyncio.Task[None] | None = None
        self.finished = False
        self.cancelled = False

    def cancel(self) -> None:
        """Give up on the command: an outstanding task is aborted in the background (the
        target's late Data-In no longer lands in the caller's buffer once this returns), a
        retry in progress is cancelled. ``done`` is not called afterwards."""
        if self.finished:
            return
        self.cancelled = True
        self.finished = True
        if self.worker is not None:
            self.worker.cancel()
        elif self.task is not None and self.conn is not None:
            self.conn.cancel_command(self.task)


@dataclass(frozen=True, slots=True)
class PathStatus:
    """A snapshot of one path for status reports and tests."""

    portal: Portal
    connected: bool
    state: AccessState | int | None
    group_id: int | None
    last_error: str


class MultipathSession:
    """All paths to one LUN of one target. Create with :meth:`start`; end with :meth:`close`."""

    def __init__(
        self,
        portals: Sequence[Portal],
        target_name: str,
        settings: InitiatorSettings,
        multipath: MultipathSettings | None = None,
        *,
        lun: int = 0,
        expected_naa: str | None = None,
    ) -> None:
        if not portals:
            raise ValueError("at least one portal is needed")
        self.target_name = target_name
        self.settings = settings
        self.multipath = multipath or MultipathSettings()
        self.lun = lun
        self.naa = expected_naa.lower() if expected_naa else None
        self._loop = asyncio.get_running_loop()
        self._paths = [_Path(portal, random_isid()) for portal in portals]
        self._changed = asyncio.Event()
        self._no_path_since: float | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._capacity_task: asyncio.Task[None] | None = None
        self._closed = False
        self.capacity: scsi.Capacity | None = None
        self.limits = scsi.BlockLimits()

    # ---- lifecycle ----------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        portals: Sequence[Portal],
        target_name: str,
        settings: InitiatorSettings,
        multipath: MultipathSettings | None = None,
        *,
        lun: int = 0,
        expected_naa: str | None = None,
    ) -> MultipathSession:
        """Log in on every portal at once and probe them.

        Raises :class:`PathIdentityError` when two paths report different NAA identifiers (or
        differ from ``expected_naa``), and :class:`NoPathError` when no path comes up; paths
        that fail here keep reconnecting in the background once at least one works.
        """
        session = cls(portals, target_name, settings, multipath, lun=lun, expected_naa=expected_naa)
        results = await asyncio.gather(
            *(session._connect(path) for path in session._paths), return_exceptions=True
        )
        identity_errors = [r for r in results if isinstance(r, PathIdentityError)]
        if identity_errors:
            await session.close()
            raise identity_errors[0]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BlockyardError):
                await session.close()
                raise result
        live = [p for p in session._paths if p.conn is not None]
        if not live:
            reasons = "; ".join(f"{p.name}: {p.last_error}" for p in session._paths)
            await session.close()
            error = NoPathError(f"no path to {target_name} could log in ({reasons})")
            first = next((r for r in results if isinstance(r, BaseException)), None)
            raise error from first
        try:
            await session._read_geometry()
        except BlockyardError:
            await session.close()
            raise
        for path in session._paths:
            if path.conn is None:
                session._schedule_reconnect(path)
        session._update_availability()
        return session

    async def close(self) -> None:
        """Stop reconnecting and log out of every path (each bounded by logout_timeout_s)."""
        self._closed = True
        for path in self._paths:
            if path.reconnecting is not None:
                path.reconnecting.cancel()
        extra = [t for t in (self._refreshing, self._capacity_task) if t is not None]
        for task in extra:
            task.cancel()
        tasks = [p.reconnecting for p in self._paths if p.reconnecting is not None] + extra
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.logout_timeout_s)
        conns = [p.conn for p in self._paths if p.conn is not None]
        for path in self._paths:
            path.conn = None
        await asyncio.gather(*(c.logout() for c in conns), return_exceptions=True)
        self._changed = _wake(self._changed)

    # ---- status -------------------------------------------------------------------------

    def paths(self) -> list[PathStatus]:
        return [
            PathStatus(
                p.portal, p.conn is not None and p.conn.alive, p.state, p.group_id, p.last_error
            )
            for p in self._paths
        ]

    def active_path(self) -> Portal | None:
        path = self._pick()
        return None if path is None else path.portal

    # ---- I/O ----------------------------------------------------------------------------

    def submit(
        self,
        cdb: bytes,
        done: Completion,
        command: str,
        lba: int | None = None,
        data_out: memoryview | None = None,
        read_length: int = 0,
        read_into: memoryview | None = None,
    ) -> Submission:
        """Start ``cdb`` now, without a coroutine, and call ``done(outcome, error)`` on the
        loop when it ends; same semantics, errors and bounds as :meth:`execute`.

        The common case (a usable path with a free slot and an open CmdSN window, answered
        GOOD in time) costs one future and one timer; anything else (no path, a full queue,
        a failure, a non-GOOD status, a timeout) continues in :meth:`execute` from where
        the first attempt left off. ``data_out`` must be a flat byte view.
        """
        sub = Submission(cdb, done, command, lba, data_out, read_length, read_into)
        path = None if self._closed else self._pick()
        conn = path.conn if path is not None else None
        task: _Task | None = None
        if conn is not None:
            try:
                task = conn.start_command(
                    cdb, data_out, read_length, read_into,
                    lambda t: self._fast_finished(sub, t.future),
                    lambda t: self._fast_timed_out(sub),
                )  # fmt: skip
            except PathFailedError:
                task = None
        if task is None:
            self._continue(sub, None)
            return sub
        sub.path, sub.conn, sub.task = path, conn, task
        return sub

    def flush(self) -> None:
        """Send what :meth:`submit` queued on every path now (see IscsiConnection.flush)."""
        for path in self._paths:
            if path.conn is not None:
                path.conn.flush()

    def _fast_finished(self, sub: Submission, future: asyncio.Future[CommandOutcome]) -> None:
        task = sub.task
        if sub.finished or (task is not None and task.aborting):
            return  # cancelled, or the timer fired and _fast_timed_out owns the command
        path, conn = sub.path, sub.conn
        assert path is not None and conn is not None
        result: CommandOutcome | BaseException
        if future.cancelled():
            result = PathFailedError(f"a command on {path.name} was cancelled")
        else:
            error = future.exception()
            if error is None:
                result = future.result()
                if not result.status or (
                    scsi.classify(result.status, result.sense) is Disposition.DONE
                ):
                    sub.finished = True
                    sub.done(result, None)
                    return
            else:
                result = error
        self._continue(sub, (path, conn, result))

    def _fast_timed_out(self, sub: Submission) -> None:
        if sub.finished:
            return
        conn, task, path = sub.conn, sub.task, sub.path
        assert conn is not None and task is not None and path is not None

        async def abort_then_retry() -> None:
            try:
                await conn.abort_timed_out(task)
            except BlockyardError as exc:
                error: BaseException = exc
            else:  # pragma: no cover - abort_timed_out always raises
                error = PathFailedError("command timed out")
            await self._resume(sub, (path, conn, error))

        sub.worker = self._loop.create_task(abort_then_retry())

    def _continue(
        self,
        sub: Submission,
        first: tuple[_Path, IscsiConnection, CommandOutcome | BaseException] | None,
    ) -> None:
        sub.worker = self._loop.create_task(self._resume(sub, first))

    async def _resume(
        self,
        sub: Submission,
        first: tuple[_Path, IscsiConnection, CommandOutcome | BaseException] | None,
    ) -> None:
        try:
            outcome = await self.execute(
                sub.cdb,
                command=sub.command,
                lba=sub.lba,
                data_out=sub.data_out,
                read_length=sub.read_length,
                read_into=sub.read_into,
                first=first,
            )
        except asyncio.CancelledError:
            if not sub.cancelled:
                raise
            return
        except BaseException as exc:  # every error goes to the caller
            if not sub.finished:
                sub.finished = True
                sub.done(None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not sub.finished:
            sub.finished = True
            sub.done(outcome, None)

    async def execute(
        self,
        cdb: bytes,
        *,
        command: str,
        lba: int | None = None,
        data_out: BytesLike | None = None,
        read_length: int = 0,
        read_into: memoryview | None = None,
        first: tuple[_Path, IscsiConnection, CommandOutcome | BaseException] | None = None,
    ) -> CommandOutcome:
        """Run ``cdb`` on the best path, failing over as the module docstring says.

        Returns only a successful outcome; a final SCSI error raises the blockyard error of
        :func:`scsi.outcome_error`, and running out of paths or time raises
        :class:`NoPathError`. ``first`` is an attempt already made (by :meth:`submit`): its
        path, connection and result are handled as if this loop had made it.
        """
        trouble_deadline: float | None = None
        last_problem = ""
        while True:
            if first is not None:
                path, conn, result = first
                first = None
                outcome_or_error = result
            else:
                if self._closed:
                    raise NoPathError(f"the session to {self.target_name} is closed")
                if trouble_deadline is not None and self._loop.time() >= trouble_deadline:
                    raise NoPathError(
                        f"{command} on {self.target_name} did not succeed within the "
                        f"{self.multipath.replacement_timeout_s} s replacement timeout "
                        f"(last problem: {last_problem})"
                    )
                picked = self._pick()
                if picked is None:
                    await self._wait_for_path(command, trouble_deadline, last_problem)
                    continue
                path = picked
                picked_conn = path.conn
                assert picked_conn is not None
                conn = picked_conn
                try:
                    outcome_or_error = await conn.execute(
                        cdb, data_out=data_out, read_length=read_length, read_into=read_into
                    )
                except CommandRejectedError:
                    raise
                except PathFailedError as exc:
                    outcome_or_error = exc
            if isinstance(outcome_or_error, BaseException):
                if not isinstance(outcome_or_error, PathFailedError):
                    raise outcome_or_error
                last_problem = f"{path.name}: {outcome_or_error}"
                self._path_failed(path, conn, outcome_or_error)
                trouble_deadline = trouble_deadline or self._trouble_deadline()
                continue
            outcome = outcome_or_error
            disposition = scsi.classify(outcome.status, outcome.sense)
            if disposition is Disposition.DONE:
                return outcome
            if disposition is Disposition.FAIL:
                raise scsi.outcome_error(command, outcome.status, outcome.sense, lba)
            trouble_deadline = trouble_deadline or self._trouble_deadline()
            last_problem = f"{path.name}: status {Status(outcome.status).name}" + (
                f" sense {outcome.sense}" if outcome.sense is not None else ""
            )
            if disposition is Disposition.FAILOVER:
                sense = outcome.sense
                assert sense is not None
                self._mark_from_sense(path, sense.asc_pair)
                await self.refresh_alua()
                if path.rank is not None:
                    # The target still reports this port as usable although it refused the
                    # command (a transition racing with our read): pause before re-issuing.
                    await asyncio.sleep(self.multipath.retry_delay_s)
            elif disposition is Disposition.RETRY_REFRESH:
                sense = outcome.sense
                if sense is not None and sense.asc_pair == CAPACITY_DATA_HAS_CHANGED:
                    self._spawn_capacity_refresh()
                await self.refresh_alua()
            else:
                await asyncio.sleep(self.multipath.retry_delay_s)

    def _trouble_deadline(self) -> float:
        return self._loop.time() + self.multipath.replacement_timeout_s

    async def _wait_for_path(
        self, command: str, trouble_deadline: float | None, last_problem: str
    ) -> None:
        """Wait for a usable path, re-reading ALUA states every ``alua_poll_s``; raise
        NoPathError once the replacement timeout since the last usable path has passed."""
        now = self._loop.time()
        since = self._no_path_since if self._no_path_since is not None else now
        deadline = since + self.multipath.replacement_timeout_s
        if trouble_deadline is not None:
            deadline = min(deadline, trouble_deadline)
        if now >= deadline:
            states = ", ".join(
                f"{p.name}={'up' if p.conn is not None else 'down'}/{_state_name(p.state)}"
                for p in self._paths
            )
            raise NoPathError(
                f"{command}: no usable path to {self.target_name} for "
                f"{self.multipath.replacement_timeout_s} s (paths: {states}; last problem: "
                f"{last_problem or 'none'}); check the volume servers and the network"
            )
        changed = self._changed
        wait = min(self.multipath.alua_poll_s, deadline - now)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await changed.wait()
        if self._pick() is None and any(p.conn is not None and p.conn.usable for p in self._paths):
            await self.refresh_alua()

    def _pick(self) -> _Path | None:
        best: _Path | None = None
        best_key: tuple[int, int] | None = None
        for path in self._paths:
            rank = path.rank
            if rank is None:
                continue
            conn = path.conn
            assert conn is not None
            key = (rank, conn.outstanding)
            if best_key is None or key < best_key:
                best, best_key = path, key
        return best

    def _mark_from_sense(self, path: _Path, asc: tuple[int, int]) -> None:
        if asc == LU_NOT_ACCESSIBLE_TRANSITION:
            path.state = AccessState.TRANSITIONING
        elif asc == LU_NOT_ACCESSIBLE_STANDBY:
            path.state = AccessState.STANDBY
        else:
            path.state = AccessState.UNAVAILABLE
        self._update_availability()

    # ---- ALUA ---------------------------------------------------------------------------

    async def refresh_alua(self) -> None:
        """Re-read each live path's access state (RTPG through that path); concurrent callers
        share one refresh. Bounded by PROBE_TIMEOUT_S per path."""
        running = self._refreshing
        if running is None or running.done():
            running = self._loop.create_task(self._refresh_all())
            self._refreshing = running
        with contextlib.suppress(BlockyardError):
            await asyncio.shield(running)

    async def _refresh_all(self) -> None:
        live = [p for p in self._paths if p.conn is not None and p.conn.usable]
        await asyncio.gather(*(self._refresh_path(p) for p in live), return_exceptions=True)
        self._last_refresh = self._loop.time()
        self._update_availability()

    async def _refresh_path(self, path: _Path) -> None:
        conn = path.conn
        if conn is None:
            return
        try:
            outcome = await self._probe(conn, scsi.report_target_port_groups(), 4096)
        except PathFailedError as exc:
            self._path_failed(path, conn, exc)
            return
        if outcome is None:
            return
        groups = scsi.parse_rtpg(outcome.data)
        for group in groups:
            if path.group_id is None and len(groups) == 1:
                path.group_id = group.group_id
            if group.group_id == path.group_id:
                if group.state != path.state:
                    log.info("path %s (group %d) is now %s", path.name, group.group_id,
                             _state_name(group.state))  # fmt: skip
                path.state = group.state

    async def _probe(self, conn: IscsiConnection, cdb: bytes, length: int) -> CommandOutcome | None:
        """Run a probe command, consuming unit attentions; None when the target refuses it."""
        for _ in range(PROBE_UNIT_ATTENTIONS_MAX):
            outcome = await conn.execute(cdb, read_length=length, timeout_s=PROBE_TIMEOUT_S)
            disposition = scsi.classify(outcome.status, outcome.sense)
            if disposition is Disposition.DONE:
                return outcome
            if disposition not in (Disposition.RETRY, Disposition.RETRY_REFRESH):
                return None
            await asyncio.sleep(self.multipath.retry_delay_s if outcome.status else 0)
        return None

    # ---- paths --------------------------------------------------------------------------

    async def _connect(self, path: _Path) -> None:
        """Log in on ``path``, check its identity and learn its port group and state."""

        def lost(conn: IscsiConnection, error: PathFailedError) -> None:
            self._path_failed(path, conn, error)

        try:
            conn = await IscsiConnection.open(
                path.portal,
                self.settings,
                target_name=self.target_name,
                isid=path.isid,
                lun=self.lun,
                on_lost=lost,
            )
        except PathFailedError as exc:
            path.last_error = str(exc)
            raise
        try:
            await self._probe(conn, scsi.test_unit_ready(), 0)
            page = scsi.VPD_DEVICE_IDENTIFICATION
            outcome = await self._probe(conn, scsi.inquiry_vpd(page), scsi.VPD_ALLOCATION_LENGTH)
            identity = scsi.parse_device_identification(outcome.data if outcome else b"")
            self._check_identity(path, identity)
            path.group_id = identity.target_port_group
            path.relative_port = identity.relative_target_port
            path.conn = conn
            await self._refresh_path(path)
        except BaseException as exc:
            path.last_error = str(exc)
            if path.conn is conn:
                path.conn = None
            conn.abort(f"path probe failed: {exc}")
            raise
        path.last_error = ""
        log.info("path %s to %s is up (group %s, %s)", path.name, self.target_name,
                 path.group_id, _state_name(path.state))  # fmt: skip

    def _check_identity(self, path: _Path, identity: scsi.DeviceIdentity) -> None:
        if identity.naa is None:
            raise PathIdentityError(
                f"{path.name} reports no NAA identifier for {self.target_name} (VPD page 83h); "
                "without one its paths cannot be proven to be the same volume"
            )
        if self.naa is None:
            self.naa = identity.naa
        elif identity.naa != self.naa:
            raise PathIdentityError(
                f"{path.name} exports {self.target_name} with NAA {identity.naa}, but other "
                f"paths (or the caller) expect {self.naa}: these are different volumes; "
                "fix the portal list"
            )

    def _path_failed(self, path: _Path, conn: IscsiConnection, error: BaseException) -> None:
        if path.conn is not conn:
            return  # already replaced
        path.conn = None
        path.last_error = str(error)
        conn.abort(f"path failed: {error}")
        log.warning("path %s to %s failed: %s", path.name, self.target_name, error)
        self._update_availability()
        if not self._closed:
            self._schedule_reconnect(path)
            # Another path may have taken over (the failed one may have been the primary).
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = self._loop.create_task(self._refresh_all())

    def _schedule_reconnect(self, path: _Path) -> None:
        if path.reconnecting is None or path.reconnecting.done():
            path.reconnecting = self._loop.create_task(self._reconnect(path))

    async def _reconnect(self, path: _Path) -> None:
        delay = self.multipath.reconnect_backoff_initial_s
        while not self._closed and path.conn is None:
            # close() cancels this task, so no closed-check is needed after the sleep.
            await asyncio.sleep(delay)
            try:
                await self._connect(path)
            except PathIdentityError as exc:
                log.error("refusing path %s: %s", path.name, exc)  # noqa: TRY400 - no traceback
            except BlockyardError as exc:
                log.info("reconnect to %s failed: %s", path.name, exc)
            else:
                self._update_availability()
                return
            delay = min(delay * 2, self.multipath.reconnect_backoff_max_s)

    def _update_availability(self) -> None:
        usable = any(p.rank is not None for p in self._paths)
        if usable:
            self._no_path_since = None
        elif self._no_path_since is None:
            self._no_path_since = self._loop.time()
            log.warning("no usable path to %s; I/O queues for up to %.1f s",
                        self.target_name, self.multipath.replacement_timeout_s)  # fmt: skip
        self._changed = _wake(self._changed)

    # ---- geometry -----------------------------------------------------------------------

    async def _read_geometry(self) -> None:
        await self._read_capacity()
        outcome = await self.execute(
            scsi.inquiry_vpd(scsi.VPD_BLOCK_LIMITS),
            command="INQUIRY (block limits)",
            read_length=scsi.VPD_ALLOCATION_LENGTH,
        )
        self.limits = scsi.parse_block_limits(outcome.data)

    def _spawn_capacity_refresh(self) -> None:
        if self._capacity_task is None or self._capacity_task.done():
            self._capacity_task = self._loop.create_task(self._refresh_capacity())

    async def _refresh_capacity(self) -> None:
        try:
            await self._read_capacity()
        except BlockyardError as exc:
            log.warning("re-reading the capacity of %s failed: %s", self.target_name, exc)

    async def read_capacity(self) -> None:
        """Re-read READ CAPACITY (16) now: how a grown LUN becomes visible without waiting
        for the next CAPACITY DATA HAS CHANGED unit attention."""
        await self._read_capacity()

    async def _read_capacity(self) -> None:
        outcome = await self.execute(
            scsi.read_capacity16(),
            command="READ CAPACITY (16)",
            read_length=scsi.READ_CAPACITY_16_LENGTH,
        )
        self.capacity = scsi.parse_capacity16(outcome.data)


def _wake(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return asyncio.Event()


def _state_name(state: AccessState | int | None) -> str:
    if state is None:
        return "unknown"
    if isinstance(state, AccessState):
        return state.name.lower()
    return f"state {state:#x}"


__all__ = [
    "DEFAULT_REPLACEMENT_TIMEOUT_S",
    "Completion",
    "MultipathSession",
    "MultipathSettings",
    "PathStatus",
    "Submission",
]
