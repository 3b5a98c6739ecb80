"""Durable replication state beside a volume (``replication.json`` on a primary,
``replica.json`` on a replica): round trips, and damaged files refused with CorruptionError
instead of being guessed around (the in-sync flag decides what a flush waits for)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockyard.errors import CorruptionError, InvalidArgumentError
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.messages import ReplicaDataState
from blockyard.replication.state import (
    MAX_ADDRESS_CHARS,
    MAX_REPLICAS,
    PRIMARY_STATE_FILE,
    REPLICA_STATE_FILE,
    PrimaryState,
    ReplicaEntry,
    ReplicaState,
    check_replica_address,
    load_primary_state,
    load_replica_state,
    remove_primary_state,
    save_primary_state,
    save_replica_state,
)

ADDRESSES = st.builds(
    "{}:{}".format,
    st.sampled_from(["10.0.0.2", "replica-1.example", "[::1]", "h"]),
    st.integers(1, 65535),
)
PRIMARY_STATES = st.builds(
    PrimaryState,
    st.sampled_from(DurabilityMode),
    st.lists(
        st.builds(ReplicaEntry, ADDRESSES, st.booleans()),
        max_size=MAX_REPLICAS,
        unique_by=lambda e: e.address,
    ).map(tuple),
    st.integers(0, 10**12),
)
REPLICA_STATES = st.builds(
    ReplicaState,
    st.sampled_from(ReplicaDataState),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)


def volume_dir(tmp_path: Path) -> Path:
    d = tmp_path / "vol-a"
    d.mkdir(exist_ok=True)
    return d


@given(state=PRIMARY_STATES)
def test_primary_state_round_trips(
    tmp_path_factory: pytest.TempPathFactory, state: PrimaryState
) -> None:
    d = tmp_path_factory.mktemp("p")
    save_primary_state(str(d), state)
    assert load_primary_state(str(d)) == state
    assert not [p for p in d.iterdir() if p.name != PRIMARY_STATE_FILE], "no temp file left"


@given(state=REPLICA_STATES)
def test_replica_state_round_trips(
    tmp_path_factory: pytest.TempPathFactory, state: ReplicaState
) -> None:
    d = tmp_path_factory.mktemp("r")
    save_replica_state(str(d), state)
    assert load_replica_state(str(d)) == state


def test_missing_files_mean_no_state(tmp_path: Path) -> None:
    d = volume_dir(tmp_path)
    assert load_primary_state(str(d)) is None
    assert load_replica_state(str(d)) is None
    remove_primary_state(str(d))  # nothing to remove: fine
    save_primary_state(str(d), PrimaryState())
    remove_primary_state(str(d))
    assert load_primary_state(str(d)) is None


def test_a_save_replaces_the_previous_state(tmp_path: Path) -> None:
    d = str(volume_dir(tmp_path))
    a = PrimaryState(DurabilityMode.SYNC_ALL, (ReplicaEntry("h:1", True),))
    save_primary_state(d, a)
    b = a.with_in_sync("h:1", False)
    save_primary_state(d, b)
    assert load_primary_state(d) == b


def test_with_in_sync_changes_one_replica() -> None:
    s = PrimaryState(
        DurabilityMode.SYNC_QUORUM, (ReplicaEntry("a:1", False), ReplicaEntry("b:1", True))
    )
    t = s.with_in_sync("a:1", True)
    assert t.replica("a:1") == ReplicaEntry("a:1", True)
    assert t.replica("b:1") == ReplicaEntry("b:1", True)
    assert s.replica("a:1") == ReplicaEntry("a:1", False), "frozen: the old state is unchanged"
    assert s.with_in_sync("c:1", True) == s
    assert s.replica("c:1") is None


@pytest.mark.parametrize("address", ["10.0.0.2:7500", "[::1]:1", "h:65535", "a" * 200 + ":80"])
def test_valid_replica_addresses(address: str) -> None:
    assert check_replica_address(address) == address


@pytest.mark.parametrize(
    "address",
    ["", "host", ":80", "host:", "host:0", "host:65536", "host:-1", "host:8o",
     "a" * MAX_ADDRESS_CHARS + ":80"],
)  # fmt: skip
def test_invalid_replica_addresses(address: str) -> None:
    with pytest.raises(InvalidArgumentError, match="HOST:PORT"):
        check_replica_address(address)


GOOD_PRIMARY = {
    "version": 1,
    "mode": "sync_all",
    "resync_limit_bps": 0,
    "replicas": [{"address": "10.0.0.2:7500", "in_sync": True}],
}


def damaged_primary() -> list[tuple[str, bytes]]:
    def doc(**changes: object) -> bytes:
        d = dict(GOOD_PRIMARY)
        for k, v in changes.items():
            if v is None:
                d.pop(k)
            else:
                d[k] = v
        return json.dumps(d).encode()

    good = json.dumps(GOOD_PRIMARY).encode()
    return [
        ("empty", b""),
        ("truncated", good[: len(good) // 2]),
        ("binary", b"\xff\xfe\x00garbage"),
        ("a list", b"[1, 2]"),
        ("no version", doc(version=None)),
        ("version 2", doc(version=2)),
        ("unknown mode", doc(mode="sync_most")),
        ("no mode", doc(mode=None)),
        ("no replicas", doc(replicas=None)),
        ("replicas not a list", doc(replicas={"a": 1})),
        (
            "too many replicas",
            doc(
                replicas=[
                    {"address": f"h:{i}", "in_sync": True} for i in range(1, MAX_REPLICAS + 2)
                ]
            ),
        ),
        ("replica without address", doc(replicas=[{"in_sync": True}])),
        ("replica without flag", doc(replicas=[{"address": "h:1"}])),
        ("bad address", doc(replicas=[{"address": "nohost", "in_sync": True}])),
        ("replica not an object", doc(replicas=["h:1"])),
        ("negative limit", doc(resync_limit_bps=-1)),
        ("limit not a number", doc(resync_limit_bps="fast")),
        ("oversized", b" " * (64 << 10) + good),
    ]


@pytest.mark.parametrize(
    ("what", "raw"), damaged_primary(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_damaged_primary_state_is_refused(tmp_path: Path, what: str, raw: bytes) -> None:
    d = volume_dir(tmp_path)
    (d / PRIMARY_STATE_FILE).write_bytes(raw)
    with pytest.raises(CorruptionError) as info:
        load_primary_state(str(d))
    assert info.value.path == str(d / PRIMARY_STATE_FILE)
    assert info.value.volume == "vol-a"
    assert "delete the file" in str(info.value), "the message says how to fix it"
    del what


@pytest.mark.parametrize("flag", ["false", "true", 0, 1, None, [True]])
def test_an_in_sync_flag_that_is_not_a_boolean_is_refused(tmp_path: Path, flag: object) -> None:
    """The flag decides whether flushes wait for the replica: a hand-edited ``"false"`` must not
    read as in sync (``bool("false")`` is True), nor anything else be guessed."""
    d = volume_dir(tmp_path)
    doc = dict(GOOD_PRIMARY, replicas=[{"address": "h:1", "in_sync": flag}])
    (d / PRIMARY_STATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(CorruptionError):
        load_primary_state(str(d))


GOOD_REPLICA = {"version": 1, "data_state": "resyncing", "resync_id": 5, "resync_final_lsn": 9}


def damaged_replica() -> list[tuple[str, bytes]]:
    def doc(**changes: object) -> bytes:
        d = dict(GOOD_REPLICA)
        for k, v in changes.items():
            if v is None:
                d.pop(k)
            else:
                d[k] = v
        return json.dumps(d).encode()

    return [
        ("empty", b""),
        ("not json", b"{data_state: consistent}"),
        ("a number", b"7"),
        ("version 0", doc(version=0)),
        ("no state", doc(data_state=None)),
        ("unknown state", doc(data_state="promoted")),
        ("negative resync id", doc(resync_id=-1)),
        ("resync id past u64", doc(resync_id=2**64)),
        ("final lsn past u64", doc(resync_final_lsn=2**64)),
        ("resync id not a number", doc(resync_id="x")),
        ("oversized", b"{" + b" " * (64 << 10) + b"}"),
    ]


@pytest.mark.parametrize(
    ("what", "raw"), damaged_replica(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_damaged_replica_state_is_refused(tmp_path: Path, what: str, raw: bytes) -> None:
    d = volume_dir(tmp_path)
    (d / REPLICA_STATE_FILE).write_bytes(raw)
    with pytest.raises(CorruptionError) as info:
        load_replica_state(str(d))
    assert info.value.path == str(d / REPLICA_STATE_FILE)
    del what


def test_replica_state_defaults_for_optional_fields(tmp_path: Path) -> None:
    d = volume_dir(tmp_path)
    (d / REPLICA_STATE_FILE).write_text(json.dumps({"version": 1, "data_state": "consistent"}))
    assert load_replica_state(str(d)) == ReplicaState(ReplicaDataState.CONSISTENT, 0, 0)
    (d / PRIMARY_STATE_FILE).write_text(
        json.dumps({"version": 1, "mode": "best_effort", "replicas": []})
    )
    assert load_primary_state(str(d)) == PrimaryState(DurabilityMode.BEST_EFFORT, (), 0)
