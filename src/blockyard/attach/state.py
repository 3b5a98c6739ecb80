"""On-disk state of attachments: one directory per attachment under a state root.

Layout (default root ``/run/blockyard/attach``; tmpfs, so it dies with the loop devices and FUSE
mounts it describes at reboot)::

    ROOT/<id>/state.json     the attachment (written atomically by its daemon)
    ROOT/<id>/daemon.lock    flock held by the daemon for its whole life: held = daemon alive
    ROOT/<id>/daemon.log     the daemon's log
    ROOT/<id>/credentials.json  CHAP credentials for the daemon (0600; the daemon reads and
                             removes it at start, so secrets never travel on a command line)
    ROOT/<id>/mnt/           the FUSE mountpoint; mnt/disk is the loop device's backing file
    ROOT/.locks/<id>.lock    flock held by a caller for one attach/detach/cleanup of <id>

Everything the attach layer may tear down is found from this root: a loop device is ours only
if its backing file is ``ROOT/<id>/mnt/disk``; a mount is ours only if its mountpoint is
``ROOT/<id>/mnt``. Nothing else is ever touched.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from blockyard.attach.errors import AttachError
from blockyard.attach.fusefile import FILE_NAME
from blockyard.errors import BlockyardTimeoutError
from blockyard.fileutil import atomic_write
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.errors import IscsiConfigError

DEFAULT_STATE_ROOT = "/run/blockyard/attach"
STATE_FILE = "state.json"
LOCK_FILE = "daemon.lock"
LOG_FILE = "daemon.log"
CREDENTIALS_FILE = "credentials.json"
#: A credentials file is two CHAP names and secrets; anything larger is not ours.
CREDENTIALS_FILE_MAX_BYTES = 4096
MOUNT_DIR = "mnt"
OP_LOCK_DIR = ".locks"
STATE_VERSION = 1
#: A state file larger than this is not ours (or is damaged): it is refused, not parsed.
STATE_FILE_MAX_BYTES = 64 << 10
#: Attachment ids: a readable volume part and a hash of the whole source spec.
ID_NAME_MAX_CHARS = 40
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Env var naming a crash point; a test hook, see :func:`crash_point`.
CRASH_ENV = "BLOCKYARD_ATTACH_CRASH_AT"
#: A caller waits this long for another caller's operation on the same attachment.
OP_LOCK_TIMEOUT_S = 120.0


class Status(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DETACHING = "detaching"


@dataclass(frozen=True, slots=True)
class AttachmentState:
    """What one attach daemon records about itself."""

    id: str
    volume: str
    source: dict[str, Any]
    fuse_mountpoint: str
    backing_file: str
    daemon_pid: int
    #: /proc/<pid>/stat starttime: tells the daemon from a later process reusing its pid.
    daemon_start_ticks: int
    started_at: float
    status: Status
    size_bytes: int = 0
    loop_device: str | None = None
    portals: list[str] = field(default_factory=list)
    iqn: str | None = None
    error: str | None = None
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AttachmentState:
        """Parse and check a state file; raises AttachError naming what is wrong."""
        try:
            raw = json.loads(text)
            _check_version(raw)
            state = cls(
                id=str(raw["id"]),
                volume=str(raw["volume"]),
                source=dict(raw["source"]),
                fuse_mountpoint=str(raw["fuse_mountpoint"]),
                backing_file=str(raw["backing_file"]),
                daemon_pid=int(raw["daemon_pid"]),
                daemon_start_ticks=int(raw["daemon_start_ticks"]),
                started_at=float(raw["started_at"]),
                status=Status(raw["status"]),
                size_bytes=int(raw.get("size_bytes", 0)),
                loop_device=None if raw.get("loop_device") is None else str(raw["loop_device"]),
                portals=[str(p) for p in raw.get("portals", [])],
                iqn=None if raw.get("iqn") is None else str(raw["iqn"]),
                error=None if raw.get("error") is None else str(raw["error"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise AttachError(f"attachment state is damaged: {exc}") from exc
        if not _ID_RE.match(state.id) or state.daemon_pid <= 0:
            raise AttachError(f"attachment state has a bad id or pid: {state.id!r}")
        return state

    def with_(self, **changes: Any) -> AttachmentState:
        return replace(self, **changes)


def _check_version(raw: object) -> None:
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        version = raw.get("version") if isinstance(raw, dict) else None
        raise ValueError(f"unknown state version {version!r}")


def check_id(attachment_id: str) -> str:
    if not _ID_RE.match(attachment_id):
        raise AttachError(f"bad attachment id {attachment_id!r}: use [A-Za-z0-9._-], 1-64 chars")
    return attachment_id


def make_id(volume: str, canonical_source: str) -> str:
    """A stable id per source: the same source always maps to the same attachment."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", volume)[:ID_NAME_MAX_CHARS].lstrip("._-") or "vol"
    digest = hashlib.sha256(canonical_source.encode()).hexdigest()[:10]
    return f"{name}-{digest}"


@dataclass(frozen=True, slots=True)
class Layout:
    """Paths of the state root; every path the attach layer owns is derived here."""

    root: str = DEFAULT_STATE_ROOT

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", os.path.abspath(self.root))

    def dir(self, attachment_id: str) -> str:
        return os.path.join(self.root, check_id(attachment_id))

    def state_file(self, attachment_id: str) -> str:
        return os.path.join(self.dir(attachment_id), STATE_FILE)

    def lock_file(self, attachment_id: str) -> str:
        return os.path.join(self.dir(attachment_id), LOCK_FILE)

    def log_file(self, attachment_id: str) -> str:
        return os.path.join(self.dir(attachment_id), LOG_FILE)

    def credentials_file(self, attachment_id: str) -> str:
        return os.path.join(self.dir(attachment_id), CREDENTIALS_FILE)

    def mountpoint(self, attachment_id: str) -> str:
        return os.path.join(self.dir(attachment_id), MOUNT_DIR)

    def backing_file(self, attachment_id: str) -> str:
        return os.path.join(self.mountpoint(attachment_id), FILE_NAME)

    def op_lock_file(self, attachment_id: str) -> str:
        return os.path.join(self.root, OP_LOCK_DIR, check_id(attachment_id) + ".lock")

    def ids(self) -> list[str]:
        """Ids of every attachment directory (whatever its state)."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if _ID_RE.match(e) and os.path.isdir(self.dir(e)))

    def id_of_path(self, path: str) -> str | None:
        """The attachment owning ``path`` (a mountpoint or backing file), or None if foreign."""
        path = os.path.abspath(path)
        prefix = self.root + os.sep
        if not path.startswith(prefix):
            return None
        parts = path[len(prefix) :].split(os.sep)
        if len(parts) < 2 or parts[1] != MOUNT_DIR or not _ID_RE.match(parts[0]):
            return None
        if len(parts) == 2 or (len(parts) == 3 and parts[2] == FILE_NAME):
            return parts[0]
        return None


def write_state(layout: Layout, state: AttachmentState) -> None:
    """Replace the state file atomically (write, fsync, rename, fsync the directory)."""
    atomic_write(layout.state_file(state.id), state.to_json().encode(), mode=0o600)


def _chap_json(chap: ChapCredentials | None) -> dict[str, str] | None:
    if chap is None:
        return None
    return {"user": chap.name, "secret": base64.b64encode(chap.secret).decode("ascii")}


def write_credentials(
    layout: Layout,
    attachment_id: str,
    chap: ChapCredentials | None,
    target_chap: ChapCredentials | None,
) -> None:
    """Hand CHAP credentials to the attachment's daemon through a 0600 file in its 0700
    directory (replaced atomically). Nothing is written without credentials."""
    path = layout.credentials_file(attachment_id)
    remove_quietly(path)
    if chap is None:
        return
    os.makedirs(layout.dir(attachment_id), mode=0o700, exist_ok=True)
    data = json.dumps({"chap": _chap_json(chap), "target_chap": _chap_json(target_chap)})
    atomic_write(path, data.encode(), mode=0o600)


def _creds_from_json(entry: object) -> ChapCredentials | None:
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise TypeError("a credentials entry is not an object")
    secret = base64.b64decode(str(entry["secret"]).encode("ascii"), validate=True)
    return ChapCredentials(str(entry["user"]), secret)


def take_credentials(
    layout: Layout, attachment_id: str
) -> tuple[ChapCredentials | None, ChapCredentials | None]:
    """Read and remove the credentials :func:`write_credentials` left (None, None without
    any). Raises AttachError, naming the file and never a secret, when it is malformed."""
    path = layout.credentials_file(attachment_id)
    try:
        with open(path, "rb") as f:
            data = f.read(CREDENTIALS_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        return None, None
    finally:
        remove_quietly(path)
    if len(data) > CREDENTIALS_FILE_MAX_BYTES:
        raise AttachError(
            f"credentials file {path} is larger than {CREDENTIALS_FILE_MAX_BYTES} bytes"
        )
    try:
        raw = json.loads(data)
        return _creds_from_json(raw.get("chap")), _creds_from_json(raw.get("target_chap"))
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        raise AttachError(f"credentials file {path} is malformed ({type(exc).__name__})") from exc
    except IscsiConfigError as exc:
        raise AttachError(f"credentials in {path} are unusable: {exc}") from exc


def read_state(layout: Layout, attachment_id: str) -> AttachmentState | None:
    """The recorded state, or None if there is none. Damaged files raise AttachError."""
    path = layout.state_file(attachment_id)
    try:
        with open(path, "rb") as f:
            data = f.read(STATE_FILE_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > STATE_FILE_MAX_BYTES:
        raise AttachError(f"{path} is larger than {STATE_FILE_MAX_BYTES} bytes; not a state file")
    state = AttachmentState.from_json(data.decode(errors="replace"))
    if state.id != attachment_id:
        raise AttachError(f"{path} describes attachment {state.id!r}, not {attachment_id!r}")
    return state


# ---- processes -------------------------------------------------------------------------------


def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (proc(5) stat field 22), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    # Fields after the name start at field 3 (state); starttime is field 22.
    if len(fields) < 20 or fields[0] == b"Z":
        return None
    return int(fields[19])


def same_process(pid: int, start_ticks: int) -> bool:
    return pid > 0 and proc_start_ticks(pid) == start_ticks


def daemon_lock_held(layout: Layout, attachment_id: str) -> bool:
    """True while a live daemon holds the attachment's lock (immune to pid reuse)."""
    try:
        fd = os.open(layout.lock_file(attachment_id), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@contextmanager
def op_lock(
    layout: Layout, attachment_id: str, timeout_s: float = OP_LOCK_TIMEOUT_S
) -> Iterator[None]:
    """Serialise callers working on one attachment (attach, detach and cleanup)."""
    path = layout.op_lock_file(attachment_id)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BlockyardTimeoutError(
                        f"another blockyard process has held the lock on attachment "
                        f"{attachment_id} for {timeout_s:.0f} s ({path}); wait for it or check "
                        "for a hung blockyard attach/detach"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def crash_point(name: str) -> None:
    """Test hook: die at once (SIGKILL, no cleanup) if ``name`` is in ``$BLOCKYARD_ATTACH_CRASH_AT``
    (comma-separated, so a daemon and its caller can both be made to die in one run).

    Crash tests use it to stop the daemon or the caller between any two steps of attach and
    detach; production never sets the variable.
    """
    if name in os.environ.get(CRASH_ENV, "").split(","):
        os.kill(os.getpid(), 9)


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def rmdir_quietly(path: str) -> bool:
    """Remove an empty directory; False if it is not empty, busy or a live mountpoint."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EBUSY, errno.ENOTCONN, errno.EEXIST):
            return False
        raise
    return True
