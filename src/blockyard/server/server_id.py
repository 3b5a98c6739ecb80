"""A volume server's stable id, kept in its data directory.

The master knows a server by this id, not by its addresses: a restarted server (same data
directory) keeps its id, so the master finds its copies again; a server given a fresh data
directory is a new server, even on the same host and ports, because its old copies are gone.

The id is created once, atomically (temporary file, fsync, rename, directory fsync), so a crash
while creating it leaves either no id (the next start makes one) or a whole one. The file is a
dot-file, which the volume store never mistakes for a volume.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from typing import Final

from blockyard.errors import InvalidArgumentError, StorageIOError
from blockyard.fileutil import atomic_write

SERVER_ID_FILE: Final = ".server-id"
#: Longest id file read (an id is 32 hex digits and a newline).
_MAX_FILE_BYTES: Final = 64


class ServerIdError(InvalidArgumentError):
    """The data directory's server id file exists but does not hold a valid id."""


def server_id_path(data_dir: str) -> str:
    return os.path.join(data_dir, SERVER_ID_FILE)


def load_or_create_server_id(data_dir: str) -> str:
    """The id stored in ``data_dir``, created (32 lowercase hex digits) if there is none.
    Raises :class:`ServerIdError` for a damaged file and ``StorageIOError``/``NoSpaceError``
    when it cannot be read or written."""
    path = server_id_path(data_dir)
    existing = _read(path)
    if existing is not None:
        return existing
    new_id = uuidlib.uuid4().hex
    atomic_write(path, f"{new_id}\n".encode(), mode=0o644)
    return new_id


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageIOError(
            f"cannot read the server id in {path}: {exc.strerror or exc}; check its permissions"
        ) from exc
    text = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _MAX_FILE_BYTES or not _valid(text):
        raise ServerIdError(
            f"{path} does not hold a server id (32 hex digits); if this data directory's "
            "volumes are to keep their identity, restore the file from a backup, otherwise "
            "remove it and the server registers as a new one"
        )
    return text


def _valid(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)
