"""Volume and snapshot names: what is allowed, checked in one place."""

from __future__ import annotations

import re

from blockyard.engine.limits import NAME_MAX_CHARS
from blockyard.errors import InvalidNameError

# Kubernetes PV/snapshot names (pvc-<uuid>, snapshot-<uuid>) fit; a leading dot is reserved for
# the store's own temporary directories.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str, *, what: str = "volume") -> str:
    if not name or len(name) > NAME_MAX_CHARS or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"{what} name {name!r} is invalid: use 1 to {NAME_MAX_CHARS} characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name
