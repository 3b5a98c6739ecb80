"""Placement policy: distinct servers, zone spread, room, fewest provisioned bytes."""

from __future__ import annotations

from master_harness import Harness, S, volume_record

from blockyard.master.placement import Candidate, place, rank

GIB = 1 << 30


def c(
    sid: str, zone: str = "", free: int = 100 * GIB, prov: int = 0, usable: bool = True
) -> Candidate:
    return Candidate(sid, zone, free, prov, usable)


def test_never_two_copies_on_one_server() -> None:
    assert place([c("a")], GIB, 3) == ["a"]
    assert len(set(place([c("a"), c("b"), c("c")], GIB, 3))) == 3


def test_fewest_provisioned_bytes_then_id() -> None:
    cands = [c("a", prov=5 * GIB), c("b", prov=1 * GIB), c("c", prov=1 * GIB)]
    assert place(cands, GIB, 2) == ["b", "c"]


def test_zones_are_spread_before_bytes() -> None:
    cands = [c("a", "z1"), c("b", "z1"), c("c", "z2", prov=50 * GIB)]
    assert place(cands, GIB, 2) == ["a", "c"]


def test_room_usability_and_zone_filter() -> None:
    cands = [c("a", free=GIB - 1), c("b", usable=False), c("c", "z9"), c("d", "z1")]
    assert rank(cands, GIB) == ["c", "d"]
    assert rank(cands, GIB, zones={"z1"}) == ["d"]
    assert rank(cands, GIB, exclude={"c"}) == ["d"]


def test_core_candidates_exclude_dead_and_draining_servers() -> None:
    h = Harness.make(("s1", "s2", "s3"), (volume_record(),))
    h.heartbeat("s1")
    h.heartbeat("s2")
    h.advance(5 * S)  # past the suspect window: only servers heard since count
    h.heartbeat("s2")
    assert [x.server_id for x in h.core.candidates(h.now) if x.usable] == ["s2"]
    assert h.core.default_replica_count(h.now) == 1
    # s2 holds a copy of "vol": its provisioned bytes say so.
    assert {x.server_id: x.provisioned_bytes for x in h.core.candidates(h.now)}["s2"] == GIB
