"""Connection and memory bounds of the iSCSI target (see docs/ARCHITECTURE.md, "Connection and
memory bounds"): the default caps, and :class:`PreloginGate`, which decides which connections
that have not logged in yet may stay.

Why pre-login connections get their own, smaller pool: before login nobody has proven anything
(no name, no CHAP), and without a pool of their own, idle TCP connections took the slots real
sessions need. A peer address gets only part of the pool, and a connection that has not sent a
single complete Login Request (and has nothing unread in its socket) is the first to make way
for a newcomer: a real initiator sends its Login Request as soon as TCP connects, an idle flood
never does.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import sys
import termios
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from blockyard.iscsi.login import TargetLoginSettings
from blockyard.iscsi.target_session import SessionLimits

#: Logged-in sessions (Normal and Discovery) per listener; a login beyond it is answered "out of
#: resources" (RFC 7143 §11.13.5, 0x0302).
SESSIONS_MAX: Final = 256
#: Logged-in Normal sessions per target; the same answer beyond it.
SESSIONS_PER_TARGET_MAX: Final = 16
#: Connections that have not completed login, per listener: their own pool, not shared with
#: sessions, so unauthenticated connections can never take a logged-in session's place.
PRELOGIN_CONNECTIONS_MAX: Final = 64
#: Of which one peer address may hold this many (an initiator needs one per session it is
#: logging in at the same moment).
PRELOGIN_PER_PEER_MAX: Final = 8
#: Per connection: no new command is taken while this many bytes of its answers are buffered
#: or being produced (the transport buffer, output not yet handed to it, and the Data-In of
#: commands being executed). It is also the transport's high-water mark.
CONNECTION_OUTPUT_BYTES_MAX: Final = 4 << 20
#: Server-wide: above this many bytes of output in all connections together, a connection
#: takes new commands only while its own output is below CONNECTION_OUTPUT_FLOOR_BYTES.
SERVER_OUTPUT_BYTES_MAX: Final = 64 << 20
#: Output any connection may have in flight even when the server-wide budget is used up, so
#: connections that never read their answers cannot stall the ones that do.
CONNECTION_OUTPUT_FLOOR_BYTES: Final = 256 << 10

#: After the output held by all connections fell by this much from its peak, the server asks
#: the allocator to return free memory to the OS (see release_free_memory).
RELEASE_AFTER_DROP_BYTES: Final = 16 << 20
#: Threads per listener for the commands that may wait on storage (reads not in the page
#: cache, writes that meet a full WAL, flushes, FUA writes, bulk commands). They mostly wait
#: in the kernel, so more threads than cores is the point: uncached reads of a deep queue run
#: in parallel.
IO_WORKERS: Final = 8
#: Of those, one volume may use at most this share at once (its further commands queue in
#: order), so a volume stuck on a stalled disk leaves the other half to every other volume.
VOLUME_IO_WORKERS_SHARE: Final = 0.5

T = TypeVar("T", bound=Hashable)


def unread_bytes(transport: asyncio.BaseTransport | None) -> int:
    """Bytes in the socket's receive queue that the transport has not read yet (FIONREAD);
    0 when that cannot be known."""
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4))
    except (OSError, ValueError):
        return 0
    return int.from_bytes(raw, sys.byteorder)


def release_free_memory() -> bool:
    """Ask glibc to hand free heap memory back to the OS (``malloc_trim(0)``, which also gives
    back free pages inside the heap). Returns whether it could (False without glibc).

    Why: glibc raises its mmap threshold each time a large mapped block is freed (up to 32 MiB),
    after which large blocks come from the heap and stay in the process's RSS when freed: after
    slow readers left a server that had buffered their 8 MiB READs, RSS stayed about 100 MiB
    higher for good (measured). Fixing the threshold instead (mallopt) made every large batch of
    answers a fresh mapping and halved 128 KiB sequential reads, so the server trims, rarely,
    after its buffered output has dropped. Takes milliseconds; call it from a timer, not per
    command.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


@dataclass(slots=True)
class AdmitResult(Generic[T]):
    """The gate's decision on a new connection: ``admitted``, and the older pre-login
    connections it displaced, which the caller must close."""

    admitted: bool
    evicted: list[T]


class PreloginGate(Generic[T]):
    """Bookkeeping of the connections that have not completed login. Not thread-safe.

    At most ``total_max`` entries, at most ``per_peer_max`` of them from one peer address. A
    newcomer over either cap displaces an entry that ``is_idle`` (has not sent a complete Login
    Request): the oldest of its own peer's, else (at the total cap only) the oldest of any
    peer's; when there is none, the newcomer is refused. Preferring its own peer's means a peer
    that keeps reconnecting mostly displaces itself, not the connections of other peers. An
    entry leaves with :meth:`forget` (login completed, connection closed).
    """

    def __init__(self, total_max: int, per_peer_max: int, is_idle: Callable[[T], bool]) -> None:
        if total_max < 1 or not 1 <= per_peer_max <= total_max:
            raise ValueError("need total_max >= 1 and 1 <= per_peer_max <= total_max")
        self.total_max = total_max
        self.per_peer_max = per_peer_max
        self._is_idle = is_idle
        self._entries: dict[T, str] = {}  # insertion order is age order
        self._per_peer: dict[str, int] = {}
        #: Newcomers refused and idle entries displaced since the counters were last taken.
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: object) -> bool:
        return entry in self._entries

    def peer_count(self, peer: str) -> int:
        return self._per_peer.get(peer, 0)

    def admit(self, entry: T, peer: str) -> AdmitResult[T]:
        evicted: list[T] = []
        if self._per_peer.get(peer, 0) >= self.per_peer_max:
            victim = self._oldest_idle(peer)
            if victim is None:
                self.refused += 1
                return AdmitResult(False, evicted)
            evicted.append(victim)
            self.forget(victim)
        elif len(self._entries) >= self.total_max:
            victim = self._oldest_idle(peer) or self._oldest_idle(None)
            if victim is None:
                self.refused += 1
                return AdmitResult(False, evicted)
            evicted.append(victim)
            self.forget(victim)
        self.evicted += len(evicted)
        self._entries[entry] = peer
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return AdmitResult(True, evicted)

    def forget(self, entry: T) -> None:
        """Remove ``entry`` if present (idempotent)."""
        peer = self._entries.pop(entry, None)
        if peer is None:
            return
        left = self._per_peer[peer] - 1
        if left:
            self._per_peer[peer] = left
        else:
            del self._per_peer[peer]

    def clear(self) -> None:
        self._entries.clear()
        self._per_peer.clear()

    def take_counts(self) -> tuple[int, int]:
        """(refused, evicted) since the last call; resets both."""
        counts = (self.refused, self.evicted)
        self.refused = self.evicted = 0
        return counts

    def _oldest_idle(self, peer: str | None) -> T | None:
        for entry, entry_peer in self._entries.items():
            if (peer is None or entry_peer == peer) and self._is_idle(entry):
                return entry
        return None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Server-wide bounds (defaults and their reasons in :mod:`~blockyard.server.iscsi_limits`).

    ``flush_workers`` threads run the commands that may wait on storage, at most
    ``volume_workers_max`` of one volume at a time (None: half of them). At most
    ``sessions_max`` logged-in sessions in total and ``sessions_per_target_max`` Normal sessions
    per target are served: a login beyond them is answered "out of resources" (RFC 7143
    §11.13.5). Connections that have
    not logged in are a separate pool of ``prelogin_max``, ``prelogin_per_peer_max`` per peer
    address, and ``limits.login_timeout_s`` to finish the login. Output in flight is bounded by
    ``connection_output_bytes_max`` per connection and ``server_output_bytes_max`` for all of
    them. ``relative_target_port_id`` and ``target_port_group_id`` identify this listener's
    SCSI target port (SPC-4 §7.8.6): a server with several listeners gives each its own, so
    ALUA states can differ per portal.
    """

    login: TargetLoginSettings = field(default_factory=TargetLoginSettings)
    limits: SessionLimits = field(default_factory=SessionLimits)
    sessions_max: int = SESSIONS_MAX
    sessions_per_target_max: int = SESSIONS_PER_TARGET_MAX
    prelogin_max: int = PRELOGIN_CONNECTIONS_MAX
    prelogin_per_peer_max: int = PRELOGIN_PER_PEER_MAX
    connection_output_bytes_max: int = CONNECTION_OUTPUT_BYTES_MAX
    server_output_bytes_max: int = SERVER_OUTPUT_BYTES_MAX
    flush_workers: int = IO_WORKERS
    volume_workers_max: int | None = None
    advertised_host: str | None = None
    relative_target_port_id: int = 1
    target_port_group_id: int = 1

    def __post_init__(self) -> None:
        if self.sessions_max < 1 or self.sessions_per_target_max < 1 or self.flush_workers < 1:
            raise ValueError("sessions_max, sessions_per_target_max and flush_workers must be >= 1")
        if self.volume_workers_max is None:
            share = max(1, int(self.flush_workers * VOLUME_IO_WORKERS_SHARE))
            object.__setattr__(self, "volume_workers_max", share)
        elif not 1 <= self.volume_workers_max <= self.flush_workers:
            raise ValueError("need 1 <= volume_workers_max <= flush_workers")
        if not 1 <= self.prelogin_per_peer_max <= self.prelogin_max:
            raise ValueError("need 1 <= prelogin_per_peer_max <= prelogin_max")
        if self.connection_output_bytes_max < 2 * CONNECTION_OUTPUT_FLOOR_BYTES:
            raise ValueError(
                f"connection_output_bytes_max must be at least {2 * CONNECTION_OUTPUT_FLOOR_BYTES}"
            )
        if self.server_output_bytes_max < self.connection_output_bytes_max:
            raise ValueError("server_output_bytes_max must be >= connection_output_bytes_max")
        # SPC-4 §7.8.6.6: both identifiers are 16-bit; relative port 0 is reserved.
        if not 1 <= self.relative_target_port_id <= 0xFFFF:
            raise ValueError("relative_target_port_id must be 1..65535")
        if not 0 <= self.target_port_group_id <= 0xFFFF:
            raise ValueError("target_port_group_id must be 0..65535")
