"""CHAP credentials on the userspace attach path: they reach the attach daemon through a 0600
file it reads and removes, never through its argv, its state file or the attachment id."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from blockyard.attach.errors import AttachError
from blockyard.attach.manager import _daemon_argv, attachment_id
from blockyard.attach.source import IscsiSource
from blockyard.attach.state import Layout, take_credentials, write_credentials
from blockyard.iscsi.chap import ChapCredentials

CHAP = ChapCredentials("node-user", b"node-secret-123")
MUTUAL = ChapCredentials("target-user", b"target-secret-45")
SOURCE = IscsiSource(
    portals=("10.0.0.1:3260",),
    iqn="iqn.2026-11.io.blockyard:v.0123456789ab",
    volume_name="v",
    chap=CHAP,
    target_chap=MUTUAL,
)


def test_secrets_stay_out_of_argv_state_and_id(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    aid = attachment_id(SOURCE)
    plain = IscsiSource(portals=SOURCE.portals, iqn=SOURCE.iqn, volume_name="v")
    assert aid == attachment_id(plain), "credentials must not change which attachment it is"
    shown = " ".join(_daemon_argv(layout, aid, SOURCE)) + repr(SOURCE) + str(SOURCE.to_dict())
    for secret in ("node-secret-123", "target-secret-45"):
        assert secret not in shown


def test_credentials_file_is_private_and_read_once(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    write_credentials(layout, "v-1", CHAP, MUTUAL)
    path = Path(layout.credentials_file("v-1"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert take_credentials(layout, "v-1") == (CHAP, MUTUAL)
    assert not path.exists()
    assert take_credentials(layout, "v-1") == (None, None)
    write_credentials(layout, "v-1", None, None)
    assert not path.exists()


def test_a_malformed_credentials_file_names_no_secret(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    write_credentials(layout, "v-1", CHAP, None)
    path = Path(layout.credentials_file("v-1"))
    path.write_text(path.read_text().replace('"user"', '"usr"'))
    with pytest.raises(AttachError) as info:
        take_credentials(layout, "v-1")
    assert "node-secret" not in str(info.value) and not path.exists()
