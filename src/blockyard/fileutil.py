"""Writing bytes to files: the one place that handles short writes, and durable state files.

``pwrite``/``pwritev``/``write`` on a regular file may write fewer bytes than asked when the
filesystem runs out of space part-way (the next call then fails with ``ENOSPC``); a flushed write
was once lost because a short count was ignored. Every write of bytes in blockyard goes through
:func:`write_fully` (positional, engine files) or :func:`write_all` (plain descriptors), which
continue after a short write and raise when the rest cannot be written. Small state files are
replaced atomically and durably with :func:`atomic_write`.

OS errors are translated here too: ``ENOSPC``/``EDQUOT`` become ``NoSpaceError``, everything else
``StorageIOError``, with the OS error chained as the cause.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Sequence

from blockyard.blockdev import BytesLike
from blockyard.errors import NoSpaceError, StorageIOError

#: Linux IOV_MAX: the most buffers one preadv/pwritev takes.
IOV_MAX = 1024


def remaining_views(buffers: Sequence[BytesLike], skip: int) -> list[memoryview]:
    """The buffers' bytes after the first ``skip``, without copying them."""
    out: list[memoryview] = []
    for b in buffers:
        mv = memoryview(b).cast("B")
        if skip >= len(mv):
            skip -= len(mv)
            continue
        out.append(mv[skip:] if skip else mv)
        skip = 0
    return out


def write_fully(
    pwritev: Callable[[Sequence[BytesLike], int], int],
    buffers: Sequence[BytesLike],
    offset: int,
    *,
    what: str,
) -> int:
    """Write every byte of ``buffers`` at ``offset`` with the raw ``pwritev``, continuing after
    short writes. Returns the total; raises the raw call's error (``NoSpaceError`` when the disk
    filled part-way) or ``StorageIOError`` if the call makes no progress. The bytes already
    written stay written: callers treat the whole range as undefined after an error."""
    total = 0
    for b in buffers:
        total += len(b) if not isinstance(b, memoryview) else b.nbytes
    done = pwritev(buffers, offset)
    if done == total:
        return total
    while done < total:
        if done < 0 or done > total:
            raise StorageIOError(f"{what}: the OS reported writing {done} of {total} bytes")
        rest = remaining_views(buffers, done)
        if len(rest) > IOV_MAX:
            rest = rest[:IOV_MAX]
        n = pwritev(rest, offset + done)
        if n <= 0:
            raise StorageIOError(
                f"{what}: wrote {done} of {total} bytes and the OS wrote nothing more; the "
                "data directory's device is failing"
            )
        done += n
    return total


def write_all(fd: int, data: BytesLike, *, what: str) -> None:
    """``os.write`` every byte of ``data`` to ``fd`` (a state file), continuing after short
    writes; OS errors are translated like the engine's."""
    view = memoryview(data).cast("B")
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            raise translate_os_error(exc, what) from exc
        if n <= 0:
            raise StorageIOError(f"{what}: the OS wrote nothing; the device is failing")
        view = view[n:]


def translate_os_error(exc: OSError, what: str) -> Exception:
    """Map an OSError to the blockyard error a caller can act on; the cause stays chained."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        err: Exception = NoSpaceError(
            f"{what}: no space left on the data directory's filesystem; free space or move "
            "volumes elsewhere"
        )
    else:
        err = StorageIOError(f"{what}: {exc.strerror or exc} (errno {exc.errno})")
    err.__cause__ = exc
    return err


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a create, rename or unlink in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_atomic_write_temp(entry: str, base: str) -> bool:
    """Whether directory entry ``entry`` is a temporary file :func:`atomic_write` left behind
    while replacing a file named ``base`` (its writer was killed between create and rename)."""
    return entry.startswith(f".{base}.") and entry.endswith(".tmp")


def atomic_write(path: str, data: BytesLike, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content, never
    a mix: a temporary file in the same directory is written fully, fsynced, renamed over
    ``path``, and the directory is fsynced. Raises ``NoSpaceError``/``StorageIOError``."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise translate_os_error(exc, f"create a temporary file in {directory}") from exc
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data, what=f"write {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise translate_os_error(exc, f"replace {path}") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        # Only costs space (or was never made); the caller's error is the one that matters.
        del exc
