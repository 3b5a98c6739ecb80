"""The server id: created once in the data directory, kept across restarts, new for a fresh
directory, and a damaged file is refused with a message saying how to fix it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockyard.engine.store import VolumeStore
from blockyard.server.server_id import (
    SERVER_ID_FILE,
    ServerIdError,
    load_or_create_server_id,
    server_id_path,
)


def test_created_once_and_kept(tmp_path: Path) -> None:
    first = load_or_create_server_id(str(tmp_path))
    assert len(first) == 32
    assert int(first, 16) >= 0
    assert (tmp_path / SERVER_ID_FILE).read_text() == f"{first}\n"
    # A restart reads the same id back.
    assert load_or_create_server_id(str(tmp_path)) == first
    # No temporary file is left behind by the atomic write.
    assert sorted(os.listdir(tmp_path)) == [SERVER_ID_FILE]


def test_fresh_directory_gets_a_new_id(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert load_or_create_server_id(str(tmp_path / "a")) != load_or_create_server_id(
        str(tmp_path / "b")
    )


@pytest.mark.parametrize("content", [b"", b"not-an-id\n", b"A" * 32, b"0" * 33, b"0" * 100])
def test_damaged_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = Path(server_id_path(str(tmp_path)))
    path.write_bytes(content)
    with pytest.raises(ServerIdError, match="remove it"):
        load_or_create_server_id(str(tmp_path))
    # Refusing never replaces what is there: an operator may still restore it.
    assert path.read_bytes() == content


def test_not_mistaken_for_a_volume(tmp_path: Path) -> None:
    load_or_create_server_id(str(tmp_path))
    assert list(VolumeStore(str(tmp_path)).names()) == []
