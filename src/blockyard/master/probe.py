"""Which replica a ``sync_quorum`` failover promotes: the one that received the most, as the
replicas answer when asked after the old primary's lease expired (pure; no I/O, no clock).

``sync_quorum`` acknowledges a write once a majority of the copies received it (the primary
counts as one; :func:`blockyard.replication.commit.decide`). So an acknowledged write may sit on
some in-sync replicas and not on others, and the LSNs the replicas last *reported* come from a
heartbeat that may predate the old primary's last acknowledgements. Choosing by them could
promote a lagging replica and lose an acknowledged write: the new primary would catch the other
replicas up to *its* history, and a resync drops what the others had beyond it.

So before promoting, the master asks the in-sync replicas for the last LSN they *received*
(:class:`~blockyard.master.intents.ProbeLsns`; the service calls each one's ``GetReplication``).
The question is asked only after the old primary's lease has certainly expired
(:mod:`blockyard.master.leases`), and the primary acknowledges a write only after the replicas
it counts reported receiving it, so every acknowledged write is in the answers of the
replicas that hold it. The master promotes once enough replicas answered that every majority
the old primary could have counted includes one of them: with ``N`` copies and quorum
``Q = N // 2 + 1``, at most ``Q - 2`` in-sync replicas may stay silent (none for N ≤ 3, the
usual sizes). Until then it asks again every :data:`PROBE_RETRY_NS` and promotes nothing: a
quorum volume whose primary and another replica are both gone waits, rather than guess.

``sync_all`` needs none of this (every in-sync replica received every acknowledged write, so
any of them will do), and ``best_effort`` promises nothing beyond the primary; both choose by
the reported LSNs without asking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from blockyard.master.intents import ProbeLsns
from blockyard.master.model import CopyState, VolumeRecord

#: A probe that left a needed replica silent is asked again after this.
PROBE_RETRY_NS: Final = 1_000_000_000


def silent_allowed(copies: int) -> int:
    """How many in-sync replicas may not answer: every majority of ``copies`` that includes
    the primary still includes a replica that answered."""
    return max(0, copies // 2 + 1 - 2)


@dataclass(slots=True)
class _Probe:
    epoch: int
    issued_ns: int
    #: server id → the highest LSN it said it received (answers of every round at this epoch).
    answers: dict[str, int] = field(default_factory=dict)
    #: When the last round finished; None while one is out.
    done_ns: int | None = None


class QuorumProbes:
    """The probes of the volumes failing over, one per volume (bounded by the registry)."""

    def __init__(self) -> None:
        self._probes: dict[str, _Probe] = {}

    def plan(
        self, rec: VolumeRecord, heard: Callable[[str], bool], now_ns: int
    ) -> Mapping[str, int] | ProbeLsns | None:
        """For a volume whose primary's lease has expired: the received LSNs to choose among
        (enough replicas answered), a probe to send, or None (wait: a probe is out, or too few
        needed replicas are heard or answered; asked again later)."""
        replicas = in_sync_replicas(rec)
        need = len(replicas) - silent_allowed(len(rec.copies))
        probe = self._probes.get(rec.name)
        if probe is not None and probe.epoch != rec.epoch:
            probe = None
        if probe is not None:
            if probe.done_ns is None:
                return None
            answered = {s: lsn for s, lsn in probe.answers.items() if s in replicas}
            if answered and len(answered) >= need:
                return answered
            if now_ns - probe.done_ns < PROBE_RETRY_NS:
                return None
        ask = tuple(s for s in replicas if heard(s))
        if not ask or len(ask) < need:
            return None
        old = {} if probe is None else probe.answers
        self._probes[rec.name] = _Probe(rec.epoch, now_ns, dict(old))
        return ProbeLsns(rec.name, rec.epoch, ask)

    def answered(self, intent: ProbeLsns, answers: Mapping[str, int], now_ns: int) -> None:
        """The replicas of ``intent`` that answered, with the LSN each received."""
        probe = self._probes.get(intent.volume)
        if probe is None or probe.epoch != intent.epoch:
            return
        for sid, lsn in answers.items():
            if sid in intent.server_ids:
                probe.answers[sid] = max(lsn, probe.answers.get(sid, 0))
        probe.done_ns = now_ns

    def failed(self, intent: ProbeLsns) -> None:
        """The probe was never sent: retried :data:`PROBE_RETRY_NS` after it was planned."""
        probe = self._probes.get(intent.volume)
        if probe is not None and probe.epoch == intent.epoch and probe.done_ns is None:
            probe.done_ns = probe.issued_ns

    def forget(self, volume: str) -> None:
        """The volume has a new epoch or is gone."""
        self._probes.pop(volume, None)

    def __len__(self) -> int:
        return len(self._probes)


def in_sync_replicas(rec: VolumeRecord) -> tuple[str, ...]:
    return tuple(
        c.server_id
        for c in rec.copies
        if c.server_id != rec.primary and c.state is CopyState.IN_SYNC
    )
