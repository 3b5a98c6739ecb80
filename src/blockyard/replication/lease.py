"""The primary's lease and the replica's promise behind it (sans-IO; injected monotonic clock).

A volume server run by a master (``blockyard serve --master``) acknowledges writes and flushes
of a primary copy only while that copy holds a **lease**, so that a partitioned primary stops
acknowledging on its own before the master may promote another copy (DESIGN invariant 2).

Terms: TTL (the master's ``--lease-ttl``, default 2 s, learnt from its grants) and MARGIN
(:data:`LEASE_MARGIN_NS`, 0.5 s).

- **Master lease.** A heartbeat reply grants (volume, epoch) for TTL. The lease runs from the
  server's own monotonic send time of the heartbeat the reply answers: the grant was made after
  that, so the server's lease never ends later than the master believes it does. The master
  promotes another copy only TTL + MARGIN after the last grant it sent.
- **Replica lease.** The primary also holds its lease while *every* replica the master may
  promote (its replica set less those the master has recorded out of sync) has answered, at
  the primary's epoch, a probe the primary sent less than TTL (at most
  :data:`REPLICA_LEASE_MAX_NS`, the TTL every replica's hold assumes) ago (the links
  probe every TTL/4 with a barrier; the replica's Ack names the highest barrier it received,
  so the answer is causally after the probe's send time). This is what keeps I/O going while
  the master is down or restarting.
- **The replica's promise** (:class:`AnswerLog`): a replica that accepted a newer epoch answers
  nothing at the old one, and a replica promoted to primary acknowledges nothing until
  :data:`REPLICA_LEASE_MAX_NS` + MARGIN after the last answer it gave (the old primary's
  replica lease ends at most that long after the probe that answer followed; its master lease
  is the master's to wait out before promoting). So the old primary and a promoted replica
  never both acknowledge.
- **No lease needed**: a primary with no replicas, or whose every replica the master has
  recorded out of sync, has no copy to be failed over to (the master never promotes one).

Why a replica the master recorded out of sync need not answer: a primary run by a master drops
a replica from the copies it waits for only after the master's ``MarkOutOfSync`` answered, and
the master answers only once the mark is in its store; the master never promotes a copy its
store holds out of sync (``master/failover.py``), and only the primary's own later heartbeat,
reporting the replica in sync again, clears the mark. So a promotion can only ever go to a copy
that still counts here, and a degraded volume keeps its replica lease from the replicas that
remain through a master outage. Why only *those*: a replica dropped locally whose mark has not
reached the master (the master unreachable, the call still in flight, or a restart that has not
re-confirmed it yet) may still be promoted, so it still counts (:meth:`PrimaryLease.set_out_of_sync`
is told only what the master confirmed at this epoch, and forgets it on any role change).

Why MARGIN = 0.5 s: monotonic clocks drift in *rate* by less than 1e-3 (under 2 ms over a
TTL); the rest covers the time between a primary's lease check and its status going out and
the master's heartbeat processing.

Threads: :class:`PrimaryLease` is updated on the event loop only; :meth:`PrimaryLease.allows`
is called from any thread (the SCSI path): a clock read and two integer attribute reads, no
lock — each attribute is replaced whole, and a reader seeing the older value of one of them
sees a state the lease really was in a moment ago.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Final

from blockyard.errors import LeaseExpiredError

Clock = Callable[[], int]

#: The master's default lease TTL (issue 13: 2 s); servers use what its grants say.
DEFAULT_LEASE_TTL_NS: Final = 2_000_000_000
#: Longest a replica lease runs past the probe it follows, whatever TTL the master grants:
#: the replica's hold (:class:`AnswerLog`) waits at least this long plus the margin, even on a
#: server that never received a grant and so never learnt the master's TTL.
REPLICA_LEASE_MAX_NS: Final = DEFAULT_LEASE_TTL_NS
#: Clock-drift and processing margin (see the module docstring).
LEASE_MARGIN_NS: Final = 500_000_000
#: Shortest and longest TTL a grant may carry (a broken master must not give a day).
MIN_LEASE_TTL_NS: Final = 100_000_000
MAX_LEASE_TTL_NS: Final = 60_000_000_000
#: Replica probes per TTL: a lost or slow answer still leaves three more chances.
PROBES_PER_TTL: Final = 4
#: Volumes an :class:`AnswerLog` remembers at most (a server holds far fewer).
MAX_ANSWER_LOG_ENTRIES: Final = 65536
#: "Forever", for a primary that needs no lease.
NO_DEADLINE_NS: Final = (1 << 63) - 1


def clamp_ttl_ns(ttl_ns: int) -> int:
    return max(MIN_LEASE_TTL_NS, min(MAX_LEASE_TTL_NS, ttl_ns))


class PrimaryLease:
    """One primary copy's lease (see the module docstring)."""

    def __init__(
        self,
        volume: str,
        *,
        epoch: int = 0,
        clock: Clock = time.monotonic_ns,
        ttl_ns: int = DEFAULT_LEASE_TTL_NS,
    ) -> None:
        self.volume = volume
        self.clock = clock
        self.epoch = epoch
        self.ttl_ns = clamp_ttl_ns(ttl_ns)
        self._replicas: frozenset[str] = frozenset()
        #: Replicas the master confirmed out of sync: they hold nothing up (module docstring).
        self._out_of_sync: frozenset[str] = frozenset()
        #: End of the master's latest grant at this epoch (0: none).
        self._master_until_ns = 0
        #: Replica → send time of the newest probe it answered at this epoch.
        self._answered_ns: dict[str, int] = {}
        #: Read by any thread: writes are allowed while not_before <= now < deadline.
        self._not_before_ns = 0
        self._deadline_ns = NO_DEADLINE_NS
        #: A role change is being applied: nothing is acknowledged until it is done.
        self._suspended = False

    # ---- queries (any thread) -------------------------------------------------------------

    def allows(self) -> bool:
        """Whether a write or flush may be acknowledged now."""
        now = self.clock()
        return self._not_before_ns <= now < self._deadline_ns

    def check(self) -> None:
        """Raise :class:`LeaseExpiredError` unless :meth:`allows`."""
        now = self.clock()
        if self._not_before_ns <= now < self._deadline_ns:
            return
        if self._suspended:
            raise LeaseExpiredError(
                f"volume {self.volume!r} is changing role (epoch {self.epoch}); retry"
            )
        if now < self._not_before_ns:
            raise LeaseExpiredError(
                f"volume {self.volume!r} was just promoted (epoch {self.epoch}) and waits "
                f"{(self._not_before_ns - now) / 1e9:.2f} s more for the old primary's lease to "
                "run out; retry"
            )
        since = f"for {(now - self._deadline_ns) / 1e9:.2f} s" if self._deadline_ns else "yet"
        raise LeaseExpiredError(
            f"volume {self.volume!r} (epoch {self.epoch}) has held no lease {since}: neither "
            "a master grant nor an answer from every replica is recent enough; writes resume "
            "when the master or the replicas can be reached again (check the network and "
            "the master), otherwise the master fails the volume over"
        )

    @property
    def required(self) -> bool:
        """Whether this primary probes its replicas at all (it has replicas). Replicas the
        master recorded out of sync are probed too, so that their answers count the moment
        they are in sync again."""
        return bool(self._replicas)

    @property
    def counted(self) -> frozenset[str]:
        """The replicas whose answers the replica lease needs (the master may promote them)."""
        return self._replicas - self._out_of_sync

    @property
    def deadline_ns(self) -> int:
        return self._deadline_ns

    @property
    def not_before_ns(self) -> int:
        return self._not_before_ns

    @property
    def replicas(self) -> frozenset[str]:
        return self._replicas

    def remaining_ns(self) -> int:
        """Time left on the lease (negative once lapsed; large when none is needed)."""
        return self._deadline_ns - self.clock()

    # ---- updates (the event loop) ---------------------------------------------------------

    def grant(self, epoch: int, start_ns: int, ttl_ns: int) -> None:
        """The master granted (volume, ``epoch``) for ``ttl_ns`` in the reply to the heartbeat
        this server sent at ``start_ns`` (its own clock). Grants for another epoch are
        ignored: an older one is stale, a newer one waits for its assignment."""
        if epoch != self.epoch:
            return
        self.ttl_ns = ttl = clamp_ttl_ns(ttl_ns)
        self._master_until_ns = max(self._master_until_ns, start_ns + ttl)
        self._recompute()

    def answered(self, replica: str, epoch: int, probe_sent_ns: int) -> None:
        """``replica`` answered, at ``epoch``, a probe sent at ``probe_sent_ns``."""
        if epoch != self.epoch or replica not in self._replicas:
            return
        if probe_sent_ns > self._answered_ns.get(replica, 0):
            self._answered_ns[replica] = probe_sent_ns
            self._recompute()

    def set_replicas(self, replicas: Iterable[str]) -> None:
        """The replica set changed: a new member must answer before it counts."""
        self._replicas = frozenset(replicas)
        self._out_of_sync &= self._replicas
        for gone in set(self._answered_ns) - self._replicas:
            del self._answered_ns[gone]
        self._recompute()

    def set_out_of_sync(self, replicas: Iterable[str]) -> None:
        """``replicas`` are recorded out of sync *by the master* at this epoch (its
        ``MarkOutOfSync`` answered): the master promotes none of them, so the replica lease no
        longer waits for their answers. Never pass a replica dropped only locally."""
        self._out_of_sync = frozenset(replicas) & self._replicas
        self._recompute()

    def set_epoch(self, epoch: int, *, stays_primary: bool) -> None:
        """The copy moved to ``epoch``. A primary that stays primary keeps its lease (the
        master assigns a new epoch to the same primary only while its lease holds, and any
        promotion elsewhere waited for it to lapse); any other change starts from none."""
        if epoch == self.epoch and stays_primary:
            return
        self.epoch = epoch
        if not stays_primary:
            self._master_until_ns = 0
            self._answered_ns.clear()
            self._out_of_sync = frozenset()
        self._recompute()

    def hold_until(self, not_before_ns: int) -> None:
        """Acknowledge nothing before ``not_before_ns`` (a promoted replica's promise)."""
        self._not_before_ns = max(self._not_before_ns, not_before_ns)

    def suspend(self) -> None:
        """Acknowledge nothing until :meth:`resume` (a promotion is being applied: its epoch
        and the hold it needs are known only once the copy's epoch has moved)."""
        self._suspended = True
        self._recompute()

    def resume(self) -> None:
        self._suspended = False
        self._recompute()

    @property
    def suspended(self) -> bool:
        return self._suspended

    def _recompute(self) -> None:
        if self._suspended:
            self._deadline_ns = 0
            return
        counted = self._replicas - self._out_of_sync
        if not counted:
            self._deadline_ns = NO_DEADLINE_NS
            return
        answers = [self._answered_ns.get(r, 0) for r in counted]
        replica_ttl = min(self.ttl_ns, REPLICA_LEASE_MAX_NS)
        replica_until = min(answers) + replica_ttl if all(answers) else 0
        self._deadline_ns = max(self._master_until_ns, replica_until)


def may_answer(local_epoch: int, connection_epoch: int) -> bool:
    """Whether a replica may still answer on a connection opened at ``connection_epoch``: not
    once its copy accepted a newer epoch (from the master, or another primary's Hello)."""
    return local_epoch == connection_epoch


class AnswerLog:
    """The replica side: when each volume last answered a primary, and so how long a copy
    promoted to primary must wait (see the module docstring). The wait covers replica leases,
    which never run longer than :data:`REPLICA_LEASE_MAX_NS` whatever the master's TTL (the
    master's own grants are covered by its promotion delay), so it needs no TTL from the
    master. Used on the event loop only."""

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic_ns,
        ttl_ns: int = REPLICA_LEASE_MAX_NS,
        margin_ns: int = LEASE_MARGIN_NS,
        max_entries: int = MAX_ANSWER_LOG_ENTRIES,
    ) -> None:
        self.clock = clock
        self.ttl_ns = clamp_ttl_ns(ttl_ns)
        self.margin_ns = margin_ns
        self._max_entries = max_entries
        self._last_ns: dict[str, int] = {}
        #: The newest answer time of any entry dropped to keep the bound: a volume not found
        #: may be one of them, so it waits as long as the newest of them would.
        self._evicted_ns = 0

    def answered(self, volume: str) -> None:
        """``volume``'s copy is about to answer its primary now."""
        if volume not in self._last_ns and len(self._last_ns) >= self._max_entries:
            self._prune()
        self._last_ns[volume] = self.clock()

    def hold_until(self, volume: str) -> int:
        """A copy of ``volume`` promoted now acknowledges nothing before this time."""
        last = self._last_ns.get(volume, self._evicted_ns)
        return last + self.ttl_ns + self.margin_ns if last else 0

    def forget(self, volume: str) -> None:
        self._last_ns.pop(volume, None)

    def __len__(self) -> int:
        return len(self._last_ns)

    def _prune(self) -> None:
        """Drop entries whose hold is over; if none is, the oldest, remembered in
        ``_evicted_ns`` (a server never holds this many volumes; if it did, unknown volumes
        would wait a little longer than needed, never less)."""
        now = self.clock()
        for volume, last in list(self._last_ns.items()):
            if last + self.ttl_ns + self.margin_ns <= now:
                del self._last_ns[volume]
        if len(self._last_ns) >= self._max_entries:
            oldest = min(self._last_ns, key=self._last_ns.__getitem__)
            self._evicted_ns = max(self._evicted_ns, self._last_ns.pop(oldest))
