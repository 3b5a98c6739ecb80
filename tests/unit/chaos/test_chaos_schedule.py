"""The chaos schedule is a function of the seed alone, and the command refuses bad usage."""

from __future__ import annotations

import itertools

import pytest

from blockyard.chaos.schedule import HOLD_S, KINDS, SETTLE_S, schedule
from blockyard.cli.main import main


def first(seed: int, kinds: tuple[str, ...] = KINDS, n: int = 50) -> list[object]:
    return list(itertools.islice(schedule(seed, kinds, 2), n))


def test_the_same_seed_gives_the_same_faults() -> None:
    assert first(7) == first(7)
    assert first(7) != first(8)


def test_faults_are_of_the_kinds_asked_and_within_their_bounds() -> None:
    specs = list(itertools.islice(schedule(3, ("kill", "delay"), 2), 500))
    assert {s.kind for s in specs} == {"kill", "delay"}
    assert [s.number for s in specs] == list(range(1, 501))
    for s in specs:
        lo, hi = HOLD_S[s.kind]
        assert lo <= s.hold_s <= hi
        assert SETTLE_S[0] <= s.settle_s <= SETTLE_S[1]
        assert s.volume in (0, 1)
        assert s.role in ("primary", "replica")
    # Both roles are aimed at, the primary more often.
    primaries = sum(s.role == "primary" for s in specs)
    assert 250 < primaries < 400


def test_clock_offsets_go_both_ways_and_never_below_the_clock_zero() -> None:
    specs = list(itertools.islice(schedule(5, ("clock",), 2), 400))
    ahead = [s.clock_offset_s(10_000.0) for s in specs if s.pick & 1]
    behind = [s.clock_offset_s(10_000.0) for s in specs if not s.pick & 1]
    assert ahead and behind
    assert all(3600 <= o <= 30 * 86400 and o % 3600 == 0 for o in ahead)
    # Behind by at most what the host clock has run (less a minute): a namespace whose
    # monotonic clock would start below zero is refused by the kernel.
    assert all(-(10_000 - 60) <= o < 0 for o in behind)
    assert {s.clock_offset_s(30.0) for s in specs if not s.pick & 1} == {0}
    # The same spec gives the same offset on the same host clock.
    assert [s.clock_offset_s(10_000.0) for s in specs] == [
        s.clock_offset_s(10_000.0) for s in specs
    ]


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        next(schedule(1, ("kill", "meteor"), 1))


@pytest.mark.parametrize(
    "args",
    [
        ["--faults", "meteor"],
        ["--faults", ""],
        ["--duration", "0s"],
        ["--layout", "raid5"],
        ["--sabotage", "everything"],
    ],
)
def test_bad_usage_exits_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chaos", *args])
    assert exc.value.code == 2
    assert "chaos" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--volumes", "--writers"])
def test_counts_below_one_exit_2(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", flag, "0"]) == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("masters", ["0", "6"])
def test_masters_out_of_range_exit_2(masters: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chaos", "--masters", masters]) == 2
    assert "--masters must be 1 to 5" in capsys.readouterr().err
