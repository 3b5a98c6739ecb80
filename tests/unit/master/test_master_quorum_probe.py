"""A sync_quorum failover chooses by what the replicas *received*, asked after the old
primary's lease expired, not by their last heartbeat; it waits while a replica that may hold
the only other copy of an acknowledged write is silent. Fake clock, no I/O (the probe's
calls are tested with fake clients at the end)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from master_harness import (
    INTERVAL_NS,
    MARGIN_NS,
    TTL_NS,
    Harness,
    primary_report,
    replica_report,
    volume_record,
)

from blockyard.engine.epoch import Role
from blockyard.errors import ServerUnavailableError, StaleEpochError
from blockyard.master import probe_calls
from blockyard.master.core import ProbeLsns, PutVolume
from blockyard.master.model import VolumeRecord
from blockyard.master.probe import PROBE_RETRY_NS, silent_allowed
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.report import ReplicationInfo


def quorum_volume(replicas: tuple[str, ...] = ("s2", "s3")) -> VolumeRecord:
    return replace(volume_record(replicas=replicas), mode=DurabilityMode.SYNC_QUORUM)


def started(rec: VolumeRecord) -> Harness:
    servers = tuple(c.server_id for c in rec.copies)
    h = Harness.make(servers, (rec,))
    h.advance(TTL_NS + MARGIN_NS)  # past the new master's hold
    h.heartbeat(rec.primary, (primary_report(rec),))
    return h


def run_until_promoted(
    h: Harness, alive: tuple[str, ...], reported: dict[str, int], until_ns: int
) -> list[PutVolume]:
    """Heartbeat steps while the primary is silent; ``alive`` report ``reported`` LSNs."""
    rec = h.volume()
    promotions: list[PutVolume] = []
    while h.now < until_ns and not promotions:
        h.advance(INTERVAL_NS)
        for sid in alive:
            h.heartbeat(sid, (replica_report(rec, durable_lsn=reported.get(sid, 100)),))
        promotions += [i for i in h.tick() if isinstance(i, PutVolume) and i.reason == "failover"]
    return promotions


def until_probed(h: Harness, rec: VolumeRecord) -> None:
    """Heartbeat steps of both replicas, the primary silent, until the master probes."""
    deadline = h.now + 10 * TTL_NS
    while not h.probes:
        h.advance(INTERVAL_NS)
        for sid in ("s2", "s3"):
            h.heartbeat(sid, (replica_report(rec),))
        h.tick()
        assert h.now < deadline, "no probe was sent"


def test_quorum_failover_promotes_the_replica_that_received_most() -> None:
    h = started(quorum_volume())
    # Their heartbeats say s2 is ahead; what they received says s3 holds more (the old
    # primary's last writes were acknowledged on s3's receipt alone).
    h.received = {"s2": 120, "s3": 150}
    promotions = run_until_promoted(h, ("s2", "s3"), {"s2": 110, "s3": 90}, h.now + 10 * TTL_NS)
    assert len(promotions) == 1
    assert [p.server_ids for p in h.probes] == [("s2", "s3")]
    assert all(p.epoch == 1 and p.volume == "vol" for p in h.probes)
    rec = h.volume()
    # The probe fenced the replicas at epoch 2; the promotion is above it.
    assert (rec.primary, rec.epoch) == ("s3", 3)


def test_the_probe_is_asked_only_after_the_lease_expired() -> None:
    h = started(quorum_volume())
    last_grant = h.now
    h.received = {"s2": 120, "s3": 150}
    rec = h.volume()
    while not h.probes:
        h.advance(INTERVAL_NS // 5)
        for sid in ("s2", "s3"):
            h.heartbeat(sid, (replica_report(rec),))
        h.tick()
        assert h.now < last_grant + 10 * TTL_NS
    # Not before the lease the primary may still act on has certainly expired.
    assert h.now >= last_grant + TTL_NS + MARGIN_NS


def test_quorum_failover_waits_while_a_needed_replica_is_silent() -> None:
    h = started(quorum_volume())
    h.received = {"s2": 120, "s3": 150}
    # s3's server died with the primary: s2 alone cannot say no acknowledged write is lost
    # (a write acknowledged on s3's receipt may be on s3 alone).
    assert run_until_promoted(h, ("s2",), {}, h.now + 20 * TTL_NS) == []
    assert h.probes == [], "a probe that could not be enough was sent"
    assert h.volume().primary == "s1"
    # s3 returns: both are asked, and the one that received most is promoted.
    promotions = run_until_promoted(h, ("s2", "s3"), {}, h.now + 10 * TTL_NS)
    assert len(promotions) == 1
    assert h.volume().primary == "s3"


def test_a_replica_that_does_not_answer_is_asked_again_before_anything_is_promoted() -> None:
    h = started(quorum_volume())
    h.received = {"s2": 120}  # s3 heartbeats but its answer is lost
    assert run_until_promoted(h, ("s2", "s3"), {}, h.now + 6 * TTL_NS) == []
    rounds = len(h.probes)
    assert rounds >= 2, "the unanswered probe was not asked again"
    # Rounds are spaced by the retry interval, not sent on every tick.
    assert rounds <= 6 * TTL_NS // PROBE_RETRY_NS + 1
    assert h.volume().primary == "s1"
    h.received["s3"] = 130
    promotions = run_until_promoted(h, ("s2", "s3"), {}, h.now + 4 * TTL_NS)
    assert len(promotions) == 1
    assert h.volume().primary == "s3"


def test_a_primary_heard_again_while_the_probe_is_out_keeps_its_volume() -> None:
    h = started(quorum_volume())
    h.auto_persist = False
    rec = h.volume()
    until_probed(h, rec)
    # The primary comes back before the answers.
    h.heartbeat("s1", (primary_report(rec),), full=True)
    h.received = {"s2": 120, "s3": 150}
    h.finish(h.probes[0])
    h.auto_persist = True
    # The probe fenced the replicas at epoch 2: the primary keeps its volume, at epoch 3, so
    # they take its stream again; nothing else is written.
    puts: list[PutVolume] = []
    for _ in range(4):
        h.advance(INTERVAL_NS)
        h.heartbeat("s1", (primary_report(rec),))
        puts += [i for i in h.tick() if isinstance(i, PutVolume)]
    assert [p.reason for p in puts] == ["refence"]
    assert (h.volume().primary, h.volume().epoch) == ("s1", 3)


def test_a_primary_cannot_mark_a_replica_out_of_sync_once_the_probe_fenced_them() -> None:
    h = started(quorum_volume())
    h.auto_persist = False
    rec = h.volume()
    until_probed(h, rec)
    # The old primary, refused by its fenced replicas, asks to go on without one: a mark
    # would leave no in-sync copy to promote, and it must stop acknowledging.
    with pytest.raises(StaleEpochError, match="failing over"):
        h.core.mark_out_of_sync("vol", 1, "s1", "10.0.0.2:9600", h.now, sent_mono_ns=h.now)


def test_sync_all_chooses_without_asking() -> None:
    rec = volume_record(replicas=("s2", "s3"))
    assert rec.mode is DurabilityMode.SYNC_ALL
    h = started(rec)
    promotions = run_until_promoted(h, ("s2", "s3"), {"s2": 80, "s3": 90}, h.now + 10 * TTL_NS)
    assert len(promotions) == 1
    assert h.probes == []
    assert h.volume().primary == "s3"


def test_two_copy_quorum_volume_asks_its_one_replica() -> None:
    h = started(quorum_volume(replicas=("s2",)))
    h.received = {"s2": 7}
    promotions = run_until_promoted(h, ("s2",), {}, h.now + 10 * TTL_NS)
    assert len(promotions) == 1
    assert [p.server_ids for p in h.probes] == [("s2",)]


@pytest.mark.parametrize(("copies", "silent"), [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1)])
def test_silent_replicas_allowed(copies: int, silent: int) -> None:
    # Every majority of `copies` that includes the primary includes one replica that answered.
    assert silent_allowed(copies) == silent


# ---- the calls ---------------------------------------------------------------------------


class FakeClient:
    def __init__(self, behaviour: ReplicationInfo | BaseException | None) -> None:
        self.behaviour = behaviour
        self.closed = False
        self.fenced: tuple[Role, int] | None = None

    async def get_replication(self, name: str) -> ReplicationInfo:
        if self.behaviour is None:
            await asyncio.sleep(3600)
        if isinstance(self.behaviour, BaseException):
            raise self.behaviour
        assert isinstance(self.behaviour, ReplicationInfo)
        return self.behaviour

    async def set_replication(self, name: str, *, role: Role, epoch: int) -> ReplicationInfo:
        self.fenced = (role, epoch)
        return await self.get_replication(name)

    async def close(self) -> None:
        self.closed = True


def info(role: Role, epoch: int, last_lsn: int) -> ReplicationInfo:
    return ReplicationInfo("vol", role, epoch, DurabilityMode.SYNC_QUORUM, last_lsn,
                           last_lsn - 5, None, True, ())  # fmt: skip


def test_received_lsns_keeps_only_timely_replica_answers_at_the_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probe_calls, "PROBE_TIMEOUT_S", 0.05)
    # The intent is at epoch 3: each replica is fenced at 4 before it answers.
    clients = {
        "api2": FakeClient(info(Role.REPLICA, 4, 120)),
        "api3": FakeClient(info(Role.REPLICA, 3, 500)),  # not fenced: its answer can grow
        "api4": FakeClient(info(Role.PRIMARY, 4, 900)),  # not a replica
        "api5": FakeClient(None),  # never answers
        "api6": FakeClient(ServerUnavailableError("down")),
        "api7": FakeClient(info(Role.REPLICA, 4, 130)),
    }
    servers = ("s2", "s3", "s4", "s5", "s6", "s7", "s8")
    api = {s: f"api{s[1:]}" for s in servers[:-1]}  # s8: no address known
    intent = ProbeLsns("vol", 3, servers)
    got = asyncio.run(probe_calls.received_lsns(intent, api, lambda a: clients[a]))
    assert got == {"s2": 120, "s7": 130}
    assert all(c.closed for c in clients.values())
    assert clients["api2"].fenced == clients["api7"].fenced == (Role.REPLICA, 4)
