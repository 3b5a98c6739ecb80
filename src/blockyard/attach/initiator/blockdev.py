"""A remote iSCSI LUN as a synchronous, thread-safe :class:`~blockyard.blockdev.BlockDevice`.

:class:`IscsiBlockDevice` runs a :class:`MultipathSession` on its own event-loop thread and
turns each call into one (or a few) SCSI commands on it. Any number of threads may call at
once; their commands are outstanding together (up to the queue depth per path and the
target's CmdSN window), so a FUSE daemon's worker threads get parallel I/O.

Hand-off: a calling thread appends its request to a deque and, only when the loop has no
wake-up pending, schedules one (``call_soon_threadsafe``); the loop drains every queued
request in that one callback and starts each without a coroutine
(:meth:`MultipathSession.submit`), so PDUs of one batch leave in one ``send()``. The caller
then blocks on a plain lock that the loop releases on completion. Each calling thread has at
most one request queued, so the queue is bounded by the number of callers; every wait is
bounded (the session's timeouts, and the facade's own call timeout as a last resort).

Durability is the target's: ``write`` returns once the target acknowledged the data (it is in
the volume's WAL), ``write(fua=True)`` and ``flush()`` once it is durable (SBC-4 FUA and
SYNCHRONIZE CACHE). Failures follow :mod:`blockyard.attach.initiator.errors`: bad requests
raise the same ``InvalidArgumentError`` subclasses as a local volume (checked locally before
anything is sent), path trouble is handled by multipath, and only an I/O that could not be
carried for the replacement timeout raises :class:`NoPathError` (a ``StorageIOError``: EIO).
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from blockyard.attach.initiator import scsi
from blockyard.attach.initiator.connection import CommandOutcome, InitiatorSettings
from blockyard.attach.initiator.errors import NoPathError, ScsiStatusError
from blockyard.attach.initiator.multipath import (
    MultipathSession,
    MultipathSettings,
    PathStatus,
    Submission,
)
from blockyard.blockdev import BytesLike, LbaStatus
from blockyard.errors import (
    InvalidArgumentError,
    MisalignedError,
    OutOfRangeError,
    TransferTooLargeError,
    VolumeClosedError,
)
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.discovery import DEFAULT_PORT, Portal

log = logging.getLogger("blockyard.attach.initiator")

T = TypeVar("T")

#: Largest READ/WRITE we send by default: 1 MiB keeps one command's buffer modest while
#: amortising per-command cost (the target's Block Limits page may lower it).
DEFAULT_MAX_TRANSFER_BYTES = 1 << 20
#: SBC-4 §5.32.2: at most this many blocks per UNMAP descriptor when the target sets no limit.
DEFAULT_MAX_UNMAP_BLOCKS = 1 << 20
DEFAULT_MAX_UNMAP_DESCRIPTORS = 64
DEFAULT_MAX_WRITE_SAME_BLOCKS = 1 << 20
#: Slack added to the computed worst case of one call before the facade gives up waiting on
#: the loop thread; the session's own timeouts fire first, this only guards against a bug.
CALL_TIMEOUT_SLACK_S = 30.0
START_THREAD_TIMEOUT_S = 10.0


def parse_portal(text: str) -> Portal:
    """``host:port`` or ``[v6]:port`` (port defaults to 3260)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else DEFAULT_PORT
        return Portal(host, port)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return Portal(text, DEFAULT_PORT)
    return Portal(host, int(port_text))


class _Request:
    """One caller's command on its way to the loop and back. ``lock`` is held until the loop
    completes the request; then exactly one of ``outcome``/``error`` is set."""

    __slots__ = (
        "abandoned",
        "cdb",
        "command",
        "data_out",
        "error",
        "inflight",
        "lba",
        "lock",
        "outcome",
        "read_into",
        "read_length",
        "sub",
    )

    def __init__(
        self,
        inflight: set[_Request],
        cdb: bytes,
        command: str,
        lba: int | None,
        data_out: memoryview | None,
        read_length: int,
        read_into: memoryview | None,
    ) -> None:
        self.inflight = inflight
        self.cdb = cdb
        self.command = command
        self.lba = lba
        self.data_out = data_out
        self.read_length = read_length
        self.read_into = read_into
        self.outcome: CommandOutcome | None = None
        self.error: BaseException | None = None
        self.sub: Submission | None = None
        self.abandoned = False
        self.lock = _thread.allocate_lock()
        self.lock.acquire()

    def complete(self, outcome: CommandOutcome | None, error: BaseException | None) -> None:
        """Loop thread (or the closing thread once the loop ended): hand the result over."""
        self.inflight.discard(self)
        if self.outcome is not None or self.error is not None:
            return
        self.outcome = outcome
        self.error = error
        self.lock.release()


@dataclass(frozen=True, slots=True)
class IscsiVolumeSpec:
    """Everything needed to attach one LUN through the userspace initiator.

    ``portals`` are all the portals exporting the volume (one path each); ``target_name`` the
    volume's IQN; ``initiator_name`` this node's IQN. ``chap``/``target_chap`` enable one-way
    or mutual CHAP. ``replacement_timeout_s`` is how long I/O waits for a usable path before
    failing with EIO. ``expected_naa`` (hex), when known (e.g. from the CSI publish context),
    refuses a portal that exports a different volume. ``initiator`` and ``multipath`` override
    every other knob.
    """

    portals: tuple[Portal, ...]
    target_name: str
    initiator_name: str
    lun: int = 0
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None
    replacement_timeout_s: float = 120.0
    expected_naa: str | None = None
    max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES
    initiator: InitiatorSettings | None = None
    multipath: MultipathSettings | None = None

    def initiator_settings(self) -> InitiatorSettings:
        if self.initiator is not None:
            return self.initiator
        return InitiatorSettings(
            initiator_name=self.initiator_name, chap=self.chap, target_chap=self.target_chap
        )

    def multipath_settings(self) -> MultipathSettings:
        if self.multipath is not None:
            return self.multipath
        return MultipathSettings(replacement_timeout_s=self.replacement_timeout_s)


class IscsiBlockDevice:
    """A remote LUN implementing :class:`~blockyard.blockdev.BlockDevice`. Thread-safe.

    Construction logs in on every portal (bounded by the connect and login timeouts) and
    raises :class:`NoPathError` or :class:`PathIdentityError` when it cannot. :meth:`close`
    logs out; using the device afterwards raises :class:`VolumeClosedError`.
    """

    def __init__(self, spec: IscsiVolumeSpec) -> None:
        if not spec.portals:
            raise InvalidArgumentError("an iSCSI volume needs at least one portal")
        self.spec = spec
        self._initiator = spec.initiator_settings()
        self._multipath = spec.multipath_settings()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name=f"iscsi-{spec.target_name[-24:]}", daemon=True
        )
        self._closed = False
        self._close_lock = threading.Lock()
        # Requests handed to the loop: appended by callers, drained by the loop (see the
        # module docstring); ``_inflight`` (loop thread only) are those started and not done.
        self._pending: deque[_Request] = deque()
        self._drain_scheduled = False
        self._inflight: set[_Request] = set()
        self._leftover_lock = threading.Lock()
        self._thread.start()
        s = self._initiator
        start_bound = (
            s.connect_timeout_s + s.login_timeout_s + 4 * s.command_timeout_s
            + self._multipath.replacement_timeout_s + CALL_TIMEOUT_SLACK_S
        )  # fmt: skip
        # Per call: every attempt is bounded by the command timeout plus an abort, and the
        # whole retry loop by the replacement timeout.
        self._call_timeout_s = (
            self._multipath.replacement_timeout_s + 2 * (s.command_timeout_s + s.tmf_timeout_s)
            + CALL_TIMEOUT_SLACK_S
        )  # fmt: skip
        try:
            self._session: MultipathSession = self._call(
                MultipathSession.start(
                    spec.portals,
                    spec.target_name,
                    self._initiator,
                    self._multipath,
                    lun=spec.lun,
                    expected_naa=spec.expected_naa,
                ),
                start_bound,
            )
        except BaseException:
            self._stop_loop()
            raise
        capacity = self._session.capacity
        assert capacity is not None
        self._capacity = capacity
        limits = self._session.limits
        lbs = capacity.logical_block_size
        cap = max(1, spec.max_transfer_bytes // lbs)
        if limits.max_transfer_blocks:
            cap = min(cap, limits.max_transfer_blocks)
        self._max_transfer_blocks = cap
        self._max_unmap_blocks = limits.max_unmap_blocks or DEFAULT_MAX_UNMAP_BLOCKS
        self._max_unmap_descriptors = min(
            limits.max_unmap_descriptors or DEFAULT_MAX_UNMAP_DESCRIPTORS,
            DEFAULT_MAX_UNMAP_DESCRIPTORS,
        )
        self._max_write_same_blocks = limits.max_write_same_blocks or DEFAULT_MAX_WRITE_SAME_BLOCKS
        self._zero_block = bytes(lbs)

    @classmethod
    def connect(
        cls,
        portals: Sequence[str | Portal],
        target_name: str,
        initiator_name: str,
        **options: object,
    ) -> IscsiBlockDevice:
        """Shorthand: ``portals`` as ``"host:port"`` strings; ``options`` are
        :class:`IscsiVolumeSpec` fields."""
        parsed = tuple(p if isinstance(p, Portal) else parse_portal(p) for p in portals)
        spec = IscsiVolumeSpec(parsed, target_name, initiator_name, **options)  # type: ignore[arg-type]
        return cls(spec)

    # ---- loop thread --------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _call(self, coro: Coroutine[object, object, T], timeout_s: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise VolumeClosedError(f"iSCSI device {self.spec.target_name} is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=timeout_s or self._call_timeout_s)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            self._barrier()
            raise NoPathError(
                f"I/O to {self.spec.target_name} did not finish within "
                f"{timeout_s or self._call_timeout_s:.0f} s"
            ) from exc

    def _barrier(self) -> None:
        """Wait until the loop has processed a cancellation, so a late Data-In can no longer
        land in the caller's buffer (the cancelled command is marked aborting first)."""
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(
                timeout=START_THREAD_TIMEOUT_S
            )

    def _stop_loop(self) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_THREAD_TIMEOUT_S)
        if not self._thread.is_alive():
            self._fail_leftovers()

    def _fail_leftovers(self) -> None:
        """After the loop thread ended: fail whatever it can no longer complete."""
        error = VolumeClosedError(f"iSCSI device {self.spec.target_name} is closed")
        with self._leftover_lock:
            leftovers = list(self._inflight)
            self._inflight.clear()
            while self._pending:
                leftovers.append(self._pending.popleft())
        for req in leftovers:
            req.complete(None, error)

    # ---- request hand-off ---------------------------------------------------------------

    def _drain(self) -> None:
        """Loop thread: start every queued request (one wake-up serves the whole batch)."""
        self._drain_scheduled = False
        pending = self._pending
        submit = self._session.submit
        inflight = self._inflight
        while pending:
            req = pending.popleft()
            if req.abandoned:
                continue
            inflight.add(req)
            try:
                req.sub = submit(
                    req.cdb, req.complete, req.command, req.lba, req.data_out,
                    req.read_length, req.read_into,
                )  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - reported to the caller, not the loop
                inflight.discard(req)
                req.complete(None, exc)
        self._session.flush()

    async def _abandon(self, req: _Request) -> None:
        """Loop thread: the caller stopped waiting; stop the command (Submission.cancel). Returns
        once the command can no longer write into the caller's buffer: an outstanding task is
        marked aborting at once, a retry coroutine once it has processed its cancellation."""
        req.abandoned = True
        self._inflight.discard(req)
        sub = req.sub
        if sub is None:
            return
        worker = sub.worker
        sub.cancel()
        if worker is not None and not worker.done():
            await asyncio.wait([worker], timeout=START_THREAD_TIMEOUT_S)

    def _submit(self, req: _Request) -> CommandOutcome:
        if self._closed:
            raise VolumeClosedError(f"iSCSI device {self.spec.target_name} is closed")
        self._pending.append(req)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: close() ran concurrently
                self._fail_leftovers()
        if not self._thread.is_alive():
            self._fail_leftovers()  # close() finished between our check and the append
        timeout = self._call_timeout_s
        if not req.lock.acquire(timeout=timeout):
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                # Also the barrier: once _abandon ran, no late Data-In lands in the buffer.
                abandon = asyncio.run_coroutine_threadsafe(self._abandon(req), self._loop)
                abandon.result(2 * START_THREAD_TIMEOUT_S)
            raise NoPathError(
                f"I/O to {self.spec.target_name} did not finish within {timeout:.0f} s"
            )
        if req.error is not None:
            raise req.error
        assert req.outcome is not None
        return req.outcome

    def close(self) -> None:
        """Log out of every path (bounded by the logout timeout) and stop the loop thread.
        Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            try:
                self._call(self._session.close(), self._initiator.logout_timeout_s * 3 + 5)
            finally:
                self._closed = True
                self._stop_loop()

    def refresh_capacity(self) -> int:
        """Ask the target for the LUN's size again (after it grew online); returns the new
        block count. Thread-safe."""
        self._call(self._session.read_capacity())
        return self.block_count

    def __enter__(self) -> IscsiBlockDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- geometry -----------------------------------------------------------------------

    @property
    def logical_block_size(self) -> int:
        return self._capacity.logical_block_size

    @property
    def physical_block_size(self) -> int:
        return self._capacity.physical_block_size

    @property
    def block_count(self) -> int:
        capacity = self._session.capacity
        return (capacity or self._capacity).block_count

    @property
    def max_transfer_blocks(self) -> int:
        return self._max_transfer_blocks

    @property
    def naa(self) -> str:
        """The logical unit's NAA identifier (hex), the same through every path."""
        naa = self._session.naa
        assert naa is not None
        return naa

    def paths(self) -> list[PathStatus]:
        """A snapshot of every path's connection and ALUA state."""
        return self._call(_snapshot(self._session), START_THREAD_TIMEOUT_S)

    # ---- checks -------------------------------------------------------------------------

    def _check_range(self, lba: int, block_count: int, what: str) -> None:
        if lba < 0 or block_count < 0 or lba + block_count > self.block_count:
            raise OutOfRangeError(
                f"{what} of {block_count} blocks at LBA {lba} is outside the volume's "
                f"{self.block_count} blocks"
            )

    def _check_transfer(self, block_count: int, what: str) -> None:
        if block_count > self._max_transfer_blocks:
            raise TransferTooLargeError(
                f"{what} of {block_count} blocks exceeds max_transfer_blocks "
                f"{self._max_transfer_blocks}; split the request"
            )

    def _blocks_of(self, nbytes: int, what: str) -> int:
        lbs = self.logical_block_size
        if nbytes % lbs:
            raise MisalignedError(
                f"{what} of {nbytes} bytes is not a whole number of {lbs}-byte blocks"
            )
        return nbytes // lbs

    def _run(
        self,
        cdb: bytes,
        command: str,
        lba: int | None,
        *,
        data_out: BytesLike | None = None,
        read_length: int = 0,
        read_into: memoryview | None = None,
    ) -> CommandOutcome:
        out: memoryview | None = None
        if data_out is not None and len(data_out):
            out = data_out if isinstance(data_out, memoryview) else memoryview(data_out)
            if out.format != "B" or out.ndim != 1:
                out = out.cast("B")
        return self._submit(
            _Request(self._inflight, cdb, command, lba, out, read_length, read_into)
        )

    # ---- I/O ----------------------------------------------------------------------------

    def read(self, lba: int, block_count: int) -> bytes:
        self._check_range(lba, block_count, "read")
        self._check_transfer(block_count, "read")
        if block_count == 0:
            return b""
        length = block_count * self.logical_block_size
        outcome = self._run(scsi.read16(lba, block_count), "READ (16)", lba, read_length=length)
        self._check_full(outcome, length, lba)
        return outcome.data

    def readinto(self, lba: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        block_count = self._blocks_of(view.nbytes, "readinto buffer")
        self._check_range(lba, block_count, "readinto")
        self._check_transfer(block_count, "readinto")
        if block_count == 0:
            return
        outcome = self._submit(
            _Request(self._inflight, scsi.read16(lba, block_count), "READ (16)", lba, None, 0, view)
        )
        self._check_full(outcome, view.nbytes, lba)

    def _check_full(self, outcome: CommandOutcome, length: int, lba: int) -> None:
        if outcome.transferred != length:
            raise ScsiStatusError(
                f"READ at LBA {lba} returned {outcome.transferred} of {length} bytes",
                status=outcome.status,
            )

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        block_count = self._blocks_of(view.nbytes, "write")
        self._check_range(lba, block_count, "write")
        self._check_transfer(block_count, "write")
        if block_count == 0:
            return
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._submit(
            _Request(
                self._inflight, scsi.write16(lba, block_count, fua=fua), "WRITE (16)", lba,
                view, 0, None,
            )
        )  # fmt: skip

    def unmap(self, lba: int, block_count: int) -> None:
        """Deallocate (UNMAP, SBC-4 §5.32); the blocks then read as zeros (LBPRZ)."""
        self._check_range(lba, block_count, "unmap")
        ranges: list[tuple[int, int]] = []
        cur, end = lba, lba + block_count
        while cur < end:
            count = min(self._max_unmap_blocks, end - cur)
            ranges.append((cur, count))
            cur += count
        for i in range(0, len(ranges), self._max_unmap_descriptors):
            chunk = ranges[i : i + self._max_unmap_descriptors]
            params = scsi.unmap_parameter_list(chunk)
            self._run(scsi.unmap(len(params)), "UNMAP", chunk[0][0], data_out=params)

    def write_zeroes(self, lba: int, block_count: int) -> None:
        """Zero the blocks with WRITE SAME (16); with LBPRZ the UNMAP bit lets the target
        deallocate them instead of writing zeros (SBC-4 §5.50, §4.7.3.4)."""
        self._check_range(lba, block_count, "write_zeroes")
        unmap = self._capacity.unmapped_reads_zero
        cur, end = lba, lba + block_count
        while cur < end:
            count = min(self._max_write_same_blocks, end - cur)
            self._run(
                scsi.write_same16(cur, count, unmap=unmap),
                "WRITE SAME (16)",
                cur,
                data_out=self._zero_block,
            )
            cur += count

    def write_same(self, lba: int, block_count: int, block: BytesLike) -> None:
        """Write one logical block of data to every block of the range with WRITE SAME (16),
        UNMAP bit clear (SBC-4 §5.50); split at the target's MAXIMUM WRITE SAME LENGTH."""
        self._check_range(lba, block_count, "write_same")
        data = bytes(block)
        if len(data) != self.logical_block_size:
            raise MisalignedError(
                f"write_same takes one {self.logical_block_size}-byte block, not {len(data)} bytes"
            )
        cur, end = lba, lba + block_count
        while cur < end:
            count = min(self._max_write_same_blocks, end - cur)
            self._run(
                scsi.write_same16(cur, count, unmap=False), "WRITE SAME (16)", cur, data_out=data
            )
            cur += count

    def flush(self) -> None:
        """SYNCHRONIZE CACHE (16): every acknowledged write is durable when this returns."""
        self._run(scsi.synchronize_cache16(), "SYNCHRONIZE CACHE (16)", None)

    def lba_status(self, lba: int) -> LbaStatus:
        """GET LBA STATUS for ``lba``; a target without it is answered conservatively
        (one block, mapped), which is always a safe answer for a provisioning query."""
        if not 0 <= lba < self.block_count:
            raise OutOfRangeError(
                f"lba_status at LBA {lba} is outside the volume's {self.block_count} blocks"
            )
        try:
            outcome = self._run(
                scsi.get_lba_status(lba),
                "GET LBA STATUS",
                lba,
                read_length=scsi.GET_LBA_STATUS_ALLOCATION_LENGTH,
            )
        except OutOfRangeError:
            raise
        except InvalidArgumentError:
            return LbaStatus(lba, 1, True)
        parsed = scsi.parse_lba_status(outcome.data, lba)
        if parsed is None:
            return LbaStatus(lba, 1, True)
        start, count, mapped = parsed
        end = min(start + count, self.block_count)
        return LbaStatus(lba, end - lba, mapped)


async def _snapshot(session: MultipathSession) -> list[PathStatus]:
    return session.paths()


__all__ = ["IscsiBlockDevice", "IscsiVolumeSpec", "parse_portal"]
