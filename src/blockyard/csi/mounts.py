"""The node's mount table, read with a timeout and checked for mount storms.

rds-csi's lessons: reading ``/proc/self/mountinfo`` can hang (a wedged NFS or FUSE server) or
be enormous (a propagation storm of thousands of mounts), so it is read in a worker thread with
a timeout and a size cap; and one source mounted again and again (a bind mount of ``/dev``
propagated 2048 times exhausted kernel memory there) is refused before another mount is added.

A duplicate is a mount of the same filesystem (``major:minor``) and the same root inside it:
exactly what repeated bind mounts of one directory look like. Container overlays or separate
tmpfs instances share a source *name* but each has its own device number, so a busy node does
not look like a storm.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections import Counter

from blockyard.csi.node_config import DEFAULT_MOUNT_STORM_THRESHOLD, DEFAULT_MOUNT_TABLE_TIMEOUT_S
from blockyard.csi.node_errors import MountStormError, MountTableTimeoutError
from blockyard.errors import StorageIOError
from blockyard.mountinfo import MOUNT_TABLE_MAX_BYTES, MOUNTINFO, Mount, parse_mountinfo

_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="mountinfo")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(MOUNT_TABLE_MAX_BYTES + 1)


def duplicates(mounts: list[Mount], threshold: int) -> list[tuple[Mount, int]]:
    """One example mount and the count of each (device, root) mounted ``threshold`` times or
    more, most frequent first."""
    counts = Counter((m.dev, m.root) for m in mounts)
    example = {(m.dev, m.root): m for m in mounts}
    return [(example[key], n) for key, n in counts.most_common() if n >= threshold]


class MountTable:
    """Reads the mount table; thread-safe (each call reads afresh)."""

    def __init__(
        self,
        *,
        path: str = MOUNTINFO,
        timeout_s: float = DEFAULT_MOUNT_TABLE_TIMEOUT_S,
        storm_threshold: int = DEFAULT_MOUNT_STORM_THRESHOLD,
    ) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.storm_threshold = storm_threshold

    def read(self) -> list[Mount]:
        """The current mounts. Raises :class:`MountTableTimeoutError` after ``timeout_s``
        and :class:`MountStormError` when the table exceeds its size cap."""
        future = _pool.submit(_read_file, self.path)
        try:
            data = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise MountTableTimeoutError(
                f"reading {self.path} took longer than {self.timeout_s:.0f} s; a mount is "
                "probably hanging (a dead NFS/FUSE server): find it with `findmnt` and "
                "unmount it lazily (`umount -l`)"
            ) from exc
        except OSError as exc:
            raise StorageIOError(f"cannot read {self.path}: {exc}") from exc
        if len(data) > MOUNT_TABLE_MAX_BYTES:
            raise MountStormError(
                f"{self.path} is larger than {MOUNT_TABLE_MAX_BYTES >> 20} MiB: a mount storm. "
                "Refusing to add mounts; inspect `findmnt` and remove the duplicates"
            )
        return parse_mountinfo(data.decode(errors="replace"))

    def at(self, path: str, mounts: list[Mount] | None = None) -> list[Mount]:
        """Mounts whose mountpoint is ``path`` (innermost last)."""
        path = os.path.abspath(path)
        return [m for m in (self.read() if mounts is None else mounts) if m.mountpoint == path]

    def check_storm(self, mounts: list[Mount] | None = None) -> list[Mount]:
        """Raise :class:`MountStormError` when one source is mounted at least the threshold
        times; returns the table read, for the caller to reuse."""
        table = self.read() if mounts is None else mounts
        found = duplicates(table, self.storm_threshold)
        if found:
            m, n = found[0]
            raise MountStormError(
                f"mount storm on this node: {m.source} ({m.fstype} {m.dev}, root {m.root}) is "
                f"mounted {n} times (threshold {self.storm_threshold}), e.g. at {m.mountpoint}. "
                "Refusing to add mounts until the duplicates are removed: list them with "
                f"`findmnt -n -o TARGET,MAJ:MIN,FSROOT | grep {m.dev}` and unmount them; "
                "then retry"
            )
        return table
