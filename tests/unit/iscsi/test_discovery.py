"""iSCSI names, the volume IQN helper and SendTargets answers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockyard.errors import InvalidNameError
from blockyard.iscsi.discovery import (
    MAX_NAME_LENGTH,
    DiscoveryTarget,
    Portal,
    iqn_for_volume,
    is_valid_iscsi_name,
    send_targets_pairs,
)

PREFIX = "iqn.2024-01.io.blockyard"


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("iqn.2024-01.io.blockyard:vol-1", True),
        ("iqn.1994-05.com.redhat:5a1b2c", True),
        ("iqn.2024-01.io.blockyard", True),
        ("iqn.2024-13.io.blockyard", False),
        ("iqn.2024-01.IO.blockyard", False),
        ("eui.02004567A425678D", True),
        ("eui.02004567a425678d", False),
        ("naa.52004567BA64678D", True),
        ("naa.62004567BA64678D0123456789ABCDEF", True),
        ("naa.1234", False),
        ("iqn.2024-01.io.x:" + "a" * 210, False),
        ("", False),
    ],
)
def test_name_validation(name: str, valid: bool) -> None:
    assert is_valid_iscsi_name(name) is valid


def test_clean_names_are_kept() -> None:
    assert iqn_for_volume(PREFIX, "pvc-1234.data") == PREFIX + ":pvc-1234.data"


def test_names_that_sanitize_alike_differ() -> None:
    a, b, c = (iqn_for_volume(PREFIX, n) for n in ("My_Vol", "my-vol", "my_vol"))
    assert len({a, b, c}) == 3
    assert b == PREFIX + ":my-vol"
    assert all(is_valid_iscsi_name(x) for x in (a, b, c))


def test_long_name_truncates_under_the_limit_deterministically() -> None:
    long = "v" * 300
    iqn = iqn_for_volume(PREFIX, long)
    assert len(iqn.encode()) <= MAX_NAME_LENGTH
    assert iqn == iqn_for_volume(PREFIX, long)
    assert iqn != iqn_for_volume(PREFIX, "v" * 301)
    assert is_valid_iscsi_name(iqn)


def test_a_name_that_looks_hashed_cannot_impersonate() -> None:
    hashed = iqn_for_volume(PREFIX, "My_Vol")
    suffix = hashed.split(":", 1)[1]
    assert iqn_for_volume(PREFIX, suffix) != hashed


@given(st.text(min_size=1, max_size=300), st.text(min_size=1, max_size=300))
def test_distinct_names_never_collide(a: str, b: str) -> None:
    x, y = iqn_for_volume(PREFIX, a), iqn_for_volume(PREFIX, b)
    assert is_valid_iscsi_name(x)
    assert (x == y) == (a == b)


def test_bad_prefix_and_empty_name() -> None:
    with pytest.raises(InvalidNameError):
        iqn_for_volume("not-an-iqn", "v")
    with pytest.raises(InvalidNameError):
        iqn_for_volume(PREFIX, "")


def test_send_targets() -> None:
    targets = [
        DiscoveryTarget("iqn.2024-01.io.b:a", (Portal("10.0.0.1", 3260, 1), Portal("fd00::1"))),
        DiscoveryTarget("iqn.2024-01.io.b:b", (Portal("host.example", 3261, 2),)),
    ]
    assert send_targets_pairs("All", targets) == [
        ("TargetName", "iqn.2024-01.io.b:a"),
        ("TargetAddress", "10.0.0.1:3260,1"),
        ("TargetAddress", "[fd00::1]:3260,1"),
        ("TargetName", "iqn.2024-01.io.b:b"),
        ("TargetAddress", "host.example:3261,2"),
    ]
    assert send_targets_pairs("iqn.2024-01.io.b:b", targets)[0] == ("TargetName", targets[1].name)
    assert send_targets_pairs("iqn.2024-01.io.b:zzz", targets) == []
    assert send_targets_pairs("", targets, session_target=targets[0].name)[0][1] == targets[0].name
    assert send_targets_pairs("All", targets, session_target=targets[0].name) == []
