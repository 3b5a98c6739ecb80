"""proc(5) mountinfo: one parser for every part of blockyard that reads the mount table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MOUNTINFO: Final = "/proc/self/mountinfo"
#: A mount table larger than this is itself a storm (rds-csi); callers refuse to act on it.
MOUNT_TABLE_MAX_BYTES: Final = 64 << 20
#: proc(5): the fields before the optional ones in a mountinfo line.
_MIN_FIELDS: Final = 6


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of proc(5) mountinfo."""

    mount_id: int
    parent_id: int
    dev: str
    root: str
    mountpoint: str
    options: tuple[str, ...]
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """proc(5): space, tab, newline and backslash are octal-escaped (``\\040``)."""
    out: list[str] = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every well-formed line of ``text``; malformed lines are skipped."""
    found: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        a = left.split()
        b = right.split()
        if len(a) < _MIN_FIELDS or len(b) < 2:
            continue
        try:
            mount_id, parent_id = int(a[0]), int(a[1])
        except ValueError:
            continue
        found.append(
            Mount(
                mount_id=mount_id,
                parent_id=parent_id,
                dev=a[2],
                root=_unescape(a[3]),
                mountpoint=_unescape(a[4]),
                options=tuple(a[5].split(",")),
                fstype=b[0],
                source=_unescape(b[1]),
            )
        )
    return found
