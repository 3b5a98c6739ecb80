"""State files, ids, layout ownership, mountinfo parsing and source specs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockyard.attach.errors import AttachError
from blockyard.attach.source import (
    IscsiSource,
    LocalSource,
    parse_source,
    source_from_dict,
)
from blockyard.attach.state import (
    AttachmentState,
    Layout,
    Status,
    make_id,
    proc_start_ticks,
    read_state,
    same_process,
    write_state,
)
from blockyard.errors import InvalidArgumentError
from blockyard.mountinfo import parse_mountinfo


def _state(layout: Layout, aid: str = "vol-0123456789") -> AttachmentState:
    return AttachmentState(
        id=aid,
        volume="vol",
        source=LocalSource("/data", "vol").to_dict(),
        fuse_mountpoint=layout.mountpoint(aid),
        backing_file=layout.backing_file(aid),
        daemon_pid=os.getpid(),
        daemon_start_ticks=proc_start_ticks(os.getpid()) or 0,
        started_at=1.5,
        status=Status.READY,
        loop_device="/dev/loop7",
    )


def test_state_round_trips_atomically(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    st = _state(layout)
    os.makedirs(layout.dir(st.id))
    write_state(layout, st)
    assert read_state(layout, st.id) == st
    assert os.listdir(layout.dir(st.id)) == ["state.json"]
    assert read_state(layout, "other-1") is None


@pytest.mark.parametrize(
    "text", ["{", "[]", '{"version": 99}', '{"version": 1, "id": "x"}', "\x00" * 10]
)
def test_damaged_state_is_refused(tmp_path: Path, text: str) -> None:
    layout = Layout(str(tmp_path))
    os.makedirs(layout.dir("vol-1"))
    Path(layout.state_file("vol-1")).write_text(text)
    with pytest.raises(AttachError):
        read_state(layout, "vol-1")


def test_ids_are_stable_and_safe() -> None:
    a = make_id("my vol/../x", "local:/d/my vol")
    assert a == make_id("my vol/../x", "local:/d/my vol")
    assert a != make_id("my vol/../x", "local:/e/my vol")
    assert "/" not in a and " " not in a
    assert not make_id("..", "x").startswith(".")


def test_layout_owns_only_its_own_paths(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path / "root"))
    assert layout.id_of_path(layout.backing_file("v-1")) == "v-1"
    assert layout.id_of_path(layout.mountpoint("v-1")) == "v-1"
    assert layout.id_of_path(str(tmp_path / "root2" / "v-1" / "mnt" / "disk")) is None
    assert layout.id_of_path(str(tmp_path / "root" / "v-1" / "other")) is None
    assert layout.id_of_path("/dev/sda") is None
    with pytest.raises(AttachError):
        layout.dir("../etc")


def test_process_identity_detects_pid_reuse() -> None:
    ticks = proc_start_ticks(os.getpid())
    assert ticks is not None
    assert same_process(os.getpid(), ticks)
    assert not same_process(os.getpid(), ticks + 1)
    assert proc_start_ticks(2**22 + 12345) is None


def test_mountinfo_parsing_unescapes_paths() -> None:
    text = (
        "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n"
        "37 35 0:52 / /run/b/v-1/mnt rw - fuse.blockyard blockyard:v-1 rw,user_id=0\n"
        "garbage line\n"
    )
    entries = parse_mountinfo(text)
    assert [e.mountpoint for e in entries] == ["/mnt/with space", "/run/b/v-1/mnt"]
    assert entries[0].dev == "98:0"
    assert entries[1].fstype == "fuse.blockyard"


def test_source_specs_parse_and_round_trip() -> None:
    local = parse_source("local:/srv/data/vol1")
    assert local == LocalSource("/srv/data", "vol1")
    iscsi = parse_source("iscsi:iqn.2024-01.io.blockyard:vol1@10.0.0.1:3260,10.0.0.2:3260/3")
    assert isinstance(iscsi, IscsiSource)
    assert iscsi.portals == ("10.0.0.1:3260", "10.0.0.2:3260") and iscsi.lun == 3
    assert iscsi.volume == "vol1"
    for spec in (local, iscsi):
        assert source_from_dict(spec.to_dict()) == spec
    swapped = IscsiSource(portals=("10.0.0.2:3260", "10.0.0.1:3260"), iqn=iscsi.iqn, lun=3)
    assert swapped.canonical() == iscsi.canonical()


@pytest.mark.parametrize(
    "text",
    [
        "local:",
        "local:vol",
        "nbd:x",
        "iscsi:iqn.2024-01.x:y",
        "iscsi:bad@1.2.3.4:3260",
        "iscsi:iqn.2024-01.x:y@host:99999",
        "iscsi:iqn.2024-01.x:y@host:3260/x",
    ],
)
def test_bad_source_specs_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_source(text)
