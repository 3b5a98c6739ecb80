"""The commit point of a replicated volume: when a flush or FUA write may be acknowledged, and
the one rule that drops a replica from the copies it waits for (sans-IO; injected clock).

Writes without FUA are acknowledged into the volatile cache, as on a disk with its write cache
on. SYNCHRONIZE CACHE and FUA writes are the durability points: the primary acknowledges them
only when the volume's durability mode holds for every record up to their LSN:

- ``best_effort`` — the local WAL is durable; replicas catch up asynchronously;
- ``sync_all`` — the local WAL is durable **and** every in-sync replica acknowledged durability;
- ``sync_quorum`` — a majority of all copies (the primary counts as one) is durable.

**Degrade or fail** (:func:`degrade_or_fail`, the only place this is decided): a replica that
misses a barrier for :data:`BARRIER_TIMEOUT_S` or whose connection drops is first *durably*
marked out of sync (the caller persists the mark; for now in the volume's replication state,
later by the master), and only then stops counting. Until the mark is durable, waiters keep
waiting for it; if marking fails, they fail — never an acknowledgement that a copy which might
later be promoted does not hold.

**Coming back** takes two steps, because flushes were acknowledged without the replica while
it was out: when it has caught up it is *joining* — every new flush waits for it (and the
timeout rule applies) — and once it is durable up to the highest LSN any flush was acknowledged
for when it started joining, it holds everything ever acknowledged: it is durably marked in sync
(:class:`MarkInSync`) and may be promoted again.

Barriers are shared like fdatasync in group commit: at most one is in flight per replica; flushes
that arrive meanwhile ride on the next one, which covers the highest LSN anyone waits for.

**Receipt** (``request(..., durable=False)``): in ``sync_all`` and ``sync_quorum`` a plain write
is acknowledged only once the replicas the mode counts *received* it (applied it to their WAL,
not necessarily synced; the replica reports that unasked after every batch). Without this, a
primary could acknowledge a write, die before shipping it, and a flush the initiator sends after
the failover would be acknowledged by the promoted copy for a write it never saw: a write the
initiator believes durable, lost. The same degrade-or-fail rule and timeout apply; a receipt
needs no barrier.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from blockyard import sabotage

#: How long an in-sync replica may take to acknowledge a barrier before it is marked out of
#: sync. Well under an initiator's SCSI command timeout (30 s in Linux and libiscsi), so a flush
#: that must degrade still completes in time; long enough for a loaded replica's fdatasync.
BARRIER_TIMEOUT_S: Final = 5.0


class DurabilityMode(enum.Enum):
    BEST_EFFORT = "best_effort"
    SYNC_ALL = "sync_all"
    SYNC_QUORUM = "sync_quorum"


@dataclass(frozen=True, slots=True)
class SendBarrier:
    replica: str
    barrier_id: int
    lsn: int


@dataclass(frozen=True, slots=True)
class MarkOutOfSync:
    """Persist that ``replica`` is out of sync, then call :meth:`CommitTracker.marked`."""

    replica: str
    reason: str


@dataclass(frozen=True, slots=True)
class MarkInSync:
    """Persist that ``replica`` is in sync (it holds every acknowledged write), then call
    :meth:`CommitTracker.marked_in_sync`."""

    replica: str


@dataclass(frozen=True, slots=True)
class Complete:
    token: int


@dataclass(frozen=True, slots=True)
class Fail:
    token: int
    reason: str


Action = SendBarrier | MarkOutOfSync | MarkInSync | Complete | Fail


class Verdict(enum.Enum):
    """What :func:`degrade_or_fail` says about a waiter."""

    DONE = "done"
    WAIT = "wait"
    FAIL = "fail"


def degrade_or_fail(
    mode: DurabilityMode,
    copies: int,
    acked: int,
    pending: int,
    unmarkable: int,
) -> Verdict:
    """Whether a durability point may be acknowledged.

    ``copies`` counts every copy of the volume (primary included); ``acked`` the replicas that
    are in sync and durable up to the waiter's LSN; ``pending`` the replicas that still count
    but have not acknowledged (in sync and responsive, or being marked out of sync); and
    ``unmarkable`` the replicas that must stop counting but whose out-of-sync mark could not
    be persisted. The primary's own durability is settled before this is asked.
    """
    if mode is DurabilityMode.BEST_EFFORT:
        return Verdict.DONE
    if unmarkable:
        # A copy that may be promoted lacks the write and we cannot record that it may not be
        # promoted: acknowledging would be a lie.
        return Verdict.FAIL
    if mode is DurabilityMode.SYNC_ALL:
        return Verdict.WAIT if pending else Verdict.DONE
    need = copies // 2 + 1
    if 1 + acked >= need:
        return Verdict.DONE
    if 1 + acked + pending >= need:
        return Verdict.WAIT
    return Verdict.FAIL


class _State(enum.Enum):
    IN_SYNC = "in_sync"
    #: Caught up and counted for new flushes; not yet known to hold every acknowledged write.
    JOINING = "joining"
    #: Timed out or disconnected; the out-of-sync mark is being persisted.
    MARKING = "marking"
    OUT_OF_SYNC = "out_of_sync"
    #: The mark could not be persisted: waiters fail until it can be.
    UNMARKABLE = "unmarkable"


#: States that count for a flush (acknowledging satisfies it).
_COUNTED = frozenset({_State.IN_SYNC, _State.JOINING})
#: States a new flush must settle: acknowledged, or durably marked out of sync.
_WAITED_FOR = frozenset({*_COUNTED, _State.MARKING, _State.UNMARKABLE})


@dataclass(slots=True)
class _Replica:
    state: _State
    durable_lsn: int = 0
    #: Applied up to here (in the replica's WAL, maybe not yet synced): what a receipt needs.
    received_lsn: int = 0
    #: JOINING: durable up to here, it holds every write acknowledged before it joined.
    join_lsn: int = 0
    #: JOINING: the in-sync mark is being persisted.
    promoting: bool = False
    inflight_id: int = 0
    inflight_lsn: int = 0
    inflight_since: float = 0.0
    connected: bool = False


@dataclass(slots=True)
class _Waiter:
    token: int
    lsn: int
    since: float
    #: A flush or FUA write (durable on the replicas); False: a receipt (received by them).
    durable: bool
    #: Replicas that must acknowledge (or be marked out) for this waiter: the in-sync set when
    #: it arrived. A replica that comes back in sync later does not hold up older flushes.
    #: In ``sync_quorum`` every replica, see :meth:`CommitTracker.request`.
    replicas: set[str] = field(default_factory=set)
    #: Older than the barrier timeout: out-of-sync replicas are waited for no longer.
    expired: bool = False


class CommitTracker:
    """Durability decisions for one primary volume. Not thread-safe: one owner (the server's
    event loop) feeds it events and carries out the actions it returns."""

    def __init__(
        self,
        mode: DurabilityMode,
        *,
        in_sync: Iterable[str] = (),
        out_of_sync: Iterable[str] = (),
        barrier_timeout_s: float = BARRIER_TIMEOUT_S,
    ) -> None:
        self.mode = mode
        self._timeout_s = barrier_timeout_s
        self._replicas: dict[str, _Replica] = {r: _Replica(_State.IN_SYNC) for r in in_sync}
        self._replicas.update({r: _Replica(_State.OUT_OF_SYNC) for r in out_of_sync})
        self._waiters: dict[int, _Waiter] = {}
        self._next_token = 1
        self._next_barrier = 1
        #: The highest LSN any durability point was acknowledged for.
        self.committed_lsn = 0
        #: The highest LSN any receipt was acknowledged for.
        self.received_committed_lsn = 0

    # ---- queries --------------------------------------------------------------------------

    @property
    def copies(self) -> int:
        return 1 + len(self._replicas)

    def in_sync(self) -> list[str]:
        return sorted(r for r, s in self._replicas.items() if s.state is _State.IN_SYNC)

    def state_of(self, replica: str) -> str:
        return self._replicas[replica].state.value

    def durable_lsn(self, replica: str) -> int:
        return self._replicas[replica].durable_lsn

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # ---- events ---------------------------------------------------------------------------

    def set_mode(self, mode: DurabilityMode, now: float) -> list[Action]:
        self.mode = mode
        return self._evaluate(now)

    def add_replica(self, replica: str) -> None:
        """A new member of the replica set: out of sync until it caught up."""
        self._replicas.setdefault(replica, _Replica(_State.OUT_OF_SYNC))

    def remove_replica(self, replica: str, now: float) -> list[Action]:
        self._replicas.pop(replica, None)
        for w in self._waiters.values():
            w.replicas.discard(replica)
        return self._evaluate(now)

    def request(self, lsn: int, now: float, *, durable: bool = True) -> tuple[int, list[Action]]:
        """A durability point at ``lsn`` (the primary's own fdatasync already covers it), or
        with ``durable=False`` a write at ``lsn`` that needs the counted replicas' receipt."""
        token = self._next_token
        self._next_token += 1
        if self.mode is DurabilityMode.SYNC_QUORUM:
            # A majority may form only once an out-of-sync replica (a new primary's, right
            # after a failover) has caught up and joined: wait for it, up to the barrier
            # timeout, rather than fail at once. Its acknowledgement counts once it joined.
            replicas = set(self._replicas)
        else:
            # Counted replicas, and those whose out-of-sync mark is not yet durable: a copy
            # that may still be promoted must hold the write or be marked first.
            replicas = {r for r, s in self._replicas.items() if s.state in _WAITED_FOR}
        waiter = _Waiter(token, lsn, now, durable, replicas)
        self._waiters[token] = waiter
        if not durable:
            # A new receipt changes nothing else (no barrier, no timeout yet, no replica
            # state): only its own verdict is due. One per write, so it must be cheap.
            action = self._decide(waiter)
            if action is None:
                return token, []
            del self._waiters[token]
            return token, [action]
        return token, self._evaluate(now)

    def cancel(self, token: int) -> None:
        self._waiters.pop(token, None)

    def connected(self, replica: str, now: float) -> list[Action]:
        r = self._replicas.get(replica)
        if r is not None:
            r.connected = True
            r.inflight_id = 0
        return self._evaluate(now)

    def disconnected(self, replica: str, now: float) -> list[Action]:
        """The replica's connection dropped: if it counted, it is marked out of sync now."""
        r = self._replicas.get(replica)
        if r is None:
            return []
        r.connected = False
        r.inflight_id = 0
        # What it received on this connection counts no more: a new one starts over.
        r.received_lsn = 0
        return self._drop(replica, r, "its connection dropped", now)

    def behind(self, replica: str, reason: str, now: float) -> list[Action]:
        """The replica reconnected but needs a resync: its copy is not whole, so it must not
        count even while its acknowledgements come in. Marked out of sync like a timeout."""
        r = self._replicas.get(replica)
        if r is None:
            return []
        return self._drop(replica, r, reason, now)

    def _drop(self, replica: str, r: _Replica, reason: str, now: float) -> list[Action]:
        if r.state in _COUNTED:
            r.state = _State.MARKING
            r.promoting = False
            return [MarkOutOfSync(replica, reason), *self._evaluate(now)]
        return self._evaluate(now)

    def caught_up(self, replica: str, now: float) -> list[Action]:
        """The replica holds a consistent copy up to the live stream: it joins (counted for
        every new flush) and is marked in sync once durable up to what was acknowledged
        before it joined."""
        r = self._replicas.get(replica)
        if r is None or r.state is not _State.OUT_OF_SYNC:
            return self._evaluate(now)
        r.state = _State.JOINING
        # Flushes already waiting do not count it (sync_quorum's do: it may make their
        # majority) but may still be acknowledged: it must hold those too before it is
        # promotable.
        # Writes acknowledged on the others' receipt alone count as acknowledged too.
        r.join_lsn = max(
            [
                self.committed_lsn,
                self.received_committed_lsn,
                *(w.lsn for w in self._waiters.values()),
            ]
        )
        r.promoting = False
        return self._evaluate(now)

    def acked(
        self, replica: str, durable_lsn: int, barrier_id: int, now: float, applied_lsn: int = 0
    ) -> list[Action]:
        """The replica is durable up to ``durable_lsn`` and holds (applied, maybe not synced)
        everything up to ``applied_lsn``; ``barrier_id`` 0 when unasked."""
        r = self._replicas.get(replica)
        if r is None:
            return []
        r.durable_lsn = max(r.durable_lsn, durable_lsn)
        r.received_lsn = max(r.received_lsn, applied_lsn, r.durable_lsn)
        if r.inflight_id and (barrier_id == r.inflight_id or r.durable_lsn >= r.inflight_lsn):
            r.inflight_id = 0
        return self._evaluate(now)

    def marked(self, replica: str, ok: bool, now: float) -> list[Action]:
        """The out-of-sync mark for ``replica`` was persisted (``ok``) or could not be."""
        r = self._replicas.get(replica)
        if r is None:
            return []
        if r.state in (_State.MARKING, _State.UNMARKABLE):
            r.state = _State.OUT_OF_SYNC if ok else _State.UNMARKABLE
        return self._evaluate(now)

    def marked_in_sync(self, replica: str, ok: bool, now: float) -> list[Action]:
        """The in-sync mark asked for by :class:`MarkInSync` was persisted (``ok``) or not
        (then it stays joining and is asked again)."""
        r = self._replicas.get(replica)
        if r is None or r.state is not _State.JOINING:
            return self._evaluate(now)
        r.promoting = False
        if ok:
            r.state = _State.IN_SYNC
        return self._evaluate(now)

    def tick(self, now: float) -> list[Action]:
        return self._evaluate(now)

    # ---- the decision ---------------------------------------------------------------------

    def _decide(self, w: _Waiter) -> Complete | Fail | None:
        """The verdict on one waiter: Complete or Fail (and what it acknowledged), or None
        while it waits."""
        acked = pending = unmarkable = 0
        for name in w.replicas:
            r = self._replicas.get(name)
            if r is None:
                continue
            if r.state is _State.OUT_OF_SYNC:
                # In sync_quorum it may still join and acknowledge; elsewhere it stopped
                # counting once durably marked.
                if self.mode is DurabilityMode.SYNC_QUORUM and not w.expired:
                    pending += 1
                continue
            if r.state is _State.UNMARKABLE:
                unmarkable += 1
            elif r.state in _COUNTED and _holds(r, w):
                acked += 1
            else:
                pending += 1
        verdict = degrade_or_fail(self.mode, self.copies, acked, pending, unmarkable)
        if sabotage.active(sabotage.ACK_BEFORE_BARRIER):
            verdict = Verdict.DONE
        if verdict is Verdict.DONE:
            if w.durable:
                self.committed_lsn = max(self.committed_lsn, w.lsn)
            else:
                self.received_committed_lsn = max(self.received_committed_lsn, w.lsn)
            return Complete(w.token)
        if verdict is Verdict.FAIL:
            return Fail(
                w.token,
                f"LSN {w.lsn} is not {'durable on' if w.durable else 'received by'} "
                f"enough copies for {self.mode.value}: "
                f"{acked} of {self.copies - 1} replicas acknowledged"
                + (f", {unmarkable} could not be marked out of sync" if unmarkable else ""),
            )
        return None

    def _evaluate(self, now: float) -> list[Action]:
        actions: list[Action] = []
        # Time out replicas that hold up a waiter past the barrier timeout.
        for w in self._waiters.values():
            if now - w.since < self._timeout_s:
                continue
            w.expired = True
            for name in sorted(w.replicas):
                r = self._replicas.get(name)
                if r is not None and r.state in _COUNTED and not _holds(r, w):
                    r.state = _State.MARKING
                    r.promoting = False
                    what = "acknowledge" if w.durable else "confirm receipt of"
                    actions.append(
                        MarkOutOfSync(
                            name, f"it did not {what} LSN {w.lsn} within {self._timeout_s:g} s"
                        )
                    )
        done: list[int] = []
        for w in self._waiters.values():
            action = self._decide(w)
            if action is not None:
                actions.append(action)
                done.append(w.token)
        for token in done:
            del self._waiters[token]
        for name, r in self._replicas.items():
            # A joining replica durable up to what was acknowledged before it joined holds
            # every acknowledged write: it may be marked in sync.
            if r.state is _State.JOINING and not r.promoting and r.durable_lsn >= r.join_lsn:
                r.promoting = True
                actions.append(MarkInSync(name))
            # One barrier in flight per connected counted replica, for the newest LSN waited on.
            if r.state not in _COUNTED or not r.connected or r.inflight_id:
                continue
            want = max(
                (w.lsn for w in self._waiters.values() if w.durable and name in w.replicas),
                default=0,
            )
            if want > r.durable_lsn:
                r.inflight_id = self._next_barrier
                self._next_barrier += 1
                r.inflight_lsn = want
                r.inflight_since = now
                actions.append(SendBarrier(name, r.inflight_id, want))
        return actions


def _holds(r: _Replica, w: _Waiter) -> bool:
    """Whether replica ``r`` satisfies waiter ``w``: durable up to its LSN, or for a receipt,
    received up to it."""
    return r.durable_lsn >= w.lsn or (not w.durable and r.received_lsn >= w.lsn)
