"""CSI object ids and list tokens.

A volume id is the volume's name on the backend. A snapshot id is ``<volume>@<snapshot>``:
it names the source volume, so DeleteSnapshot and clones find the snapshot without a lookup
table, and ``@`` cannot occur in either name (:mod:`blockyard.engine.names`). List tokens are
opaque to the CO: a tag plus the last id of the previous page, base64url-encoded.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

from blockyard.csi.errors import InvalidStartingTokenError
from blockyard.engine.names import check_name
from blockyard.errors import InvalidNameError
from blockyard.server.backend import SnapshotRef

SNAPSHOT_ID_SEPARATOR: Final = "@"
#: CSI spec "Size Limits": strings are at most 128 bytes; a token we issue stays well inside
#: twice that plus the tag, so anything longer is not ours.
MAX_TOKEN_CHARS: Final = 1024
_SNAPSHOT_TOKEN_TAG: Final = "s1:"


def is_volume_id(volume_id: str) -> bool:
    try:
        check_name(volume_id)
    except InvalidNameError:
        return False
    return True


def snapshot_id(ref: SnapshotRef) -> str:
    return f"{ref.volume}{SNAPSHOT_ID_SEPARATOR}{ref.snapshot}"


def parse_snapshot_id(value: str) -> SnapshotRef | None:
    """The snapshot ``value`` names, or None when it is not an id this driver issues (so, per
    the CSI spec, the snapshot does not exist)."""
    volume, sep, snapshot = value.partition(SNAPSHOT_ID_SEPARATOR)
    if not sep or not is_volume_id(volume) or not is_volume_id(snapshot):
        return None
    return SnapshotRef(volume, snapshot)


def encode_snapshot_token(last_id: str) -> str:
    return base64.urlsafe_b64encode((_SNAPSHOT_TOKEN_TAG + last_id).encode()).decode()


def decode_snapshot_token(token: str) -> str | None:
    """The last snapshot id of the previous page, None for the first page."""
    if not token:
        return None
    bad = InvalidStartingTokenError(
        f"starting_token {token[:64]!r} was not issued by this driver: pass next_token from "
        "the previous ListSnapshots answer unchanged, or empty to start over"
    )
    if len(token) > MAX_TOKEN_CHARS:
        raise bad
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise bad from exc
    if not text.startswith(_SNAPSHOT_TOKEN_TAG):
        raise bad
    last = text[len(_SNAPSHOT_TOKEN_TAG) :]
    if parse_snapshot_id(last) is None:
        raise bad
    return last
