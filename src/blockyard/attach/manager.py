"""Caller side of the attach layer: attach, detach, list and clean up attachments.

This is the API the CLI and the CSI node plugin use. Every function is idempotent and safe to
retry after either side crashed at any step, because the truth is on disk (state directory,
daemon lock) and in the kernel (loop devices, mounts), never in the caller's memory:

- :func:`attach` returns the existing attachment of the same source if its daemon is alive
  (adopt), cleans up a broken one, or starts a daemon and waits for it to be ready.
- :func:`detach` tears one attachment down (refusing while its device is in use unless forced).
- :func:`list_attachments` reports every attachment with its health.
- :func:`cleanup` is what a restarted node plugin calls first: it adopts healthy attachments
  and removes what dead daemons and interrupted operations left behind.

Only loop devices backed by files under the state root, mounts under the state root, and
processes recorded there (pid *and* start time match) are ever touched.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from blockyard.attach import loop as loopmod
from blockyard.attach import mounts
from blockyard.attach.daemon import ERROR_PREFIX, READY_PREFIX, remove_state_dir
from blockyard.attach.errors import AttachError, AttachmentNotFoundError, DeviceInUseError
from blockyard.attach.source import IscsiSource, SourceSpec, check_available
from blockyard.attach.state import (
    DEFAULT_STATE_ROOT,
    AttachmentState,
    Layout,
    Status,
    crash_point,
    daemon_lock_held,
    make_id,
    op_lock,
    read_state,
    remove_quietly,
    same_process,
    write_credentials,
)
from blockyard.errors import BlockyardTimeoutError

log = logging.getLogger(__name__)

#: A daemon has this long to open its source, mount FUSE and attach the loop device.
ATTACH_TIMEOUT_S = 60.0
#: A daemon has this long to flush and tear down after SIGTERM before it is killed.
DETACH_TIMEOUT_S = 60.0
#: Grace for a SIGKILLed process to disappear.
KILL_WAIT_S = 10.0
#: A daemon has this long to re-read its source's size after SIGUSR1.
RESIZE_TIMEOUT_S = 30.0
#: Without an expected size, how long to give the daemon to answer a size refresh (it looks
#: every 0.5 s).
RESIZE_SETTLE_S = 2.0


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment as found on disk and in the kernel."""

    id: str
    state: AttachmentState | None
    daemon_alive: bool
    loop_devices: tuple[str, ...]
    fuse_mounted: bool
    #: Mountpoints of filesystems on the loop device (or its partitions), in this namespace.
    mounted_at: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())

    @property
    def healthy(self) -> bool:
        return (
            self.state is not None
            and self.state.status is Status.READY
            and self.daemon_alive
            and self.fuse_mounted
            and self.state.loop_device in self.loop_devices
        )

    @property
    def health(self) -> str:
        if self.healthy:
            return "ready"
        if self.daemon_alive and self.state is not None:
            return self.state.status.value
        return "broken"

    @property
    def device(self) -> str | None:
        if self.state is not None and self.state.loop_device:
            return self.state.loop_device
        return self.loop_devices[0] if self.loop_devices else None

    def to_dict(self) -> dict[str, object]:
        st = self.state
        return {
            "id": self.id,
            "health": self.health,
            "volume": st.volume if st else None,
            "device": self.device,
            "source": st.source if st else None,
            "portals": st.portals if st else [],
            "iqn": st.iqn if st else None,
            "size_bytes": st.size_bytes if st else None,
            "daemon_pid": st.daemon_pid if st else None,
            "daemon_alive": self.daemon_alive,
            "started_at": st.started_at if st else None,
            "status": st.status.value if st else None,
            "fuse_mountpoint": st.fuse_mountpoint if st else None,
            "fuse_mounted": self.fuse_mounted,
            "loop_devices": list(self.loop_devices),
            "mounted_at": list(self.mounted_at),
            "problems": list(self.problems),
        }


def attachment_id(source: SourceSpec) -> str:
    return make_id(source.volume, source.canonical())


def inspect(layout: Layout, attachment_id: str) -> Attachment:
    """Look at one attachment; never changes anything."""
    problems: list[str] = []
    try:
        state = read_state(layout, attachment_id)
    except AttachError as exc:
        state = None
        problems.append(str(exc))
    alive = daemon_lock_held(layout, attachment_id)
    if alive and state is not None and not same_process(state.daemon_pid, state.daemon_start_ticks):
        problems.append(f"the daemon lock is held but pid {state.daemon_pid} is not the daemon")
    loops = tuple(li.device for li in loopmod.loops_backed_by(layout.backing_file(attachment_id)))
    fuse = bool(mounts.mounts_at(layout.mountpoint(attachment_id)))
    mounted: list[str] = []
    for dev in loops:
        mounted += [m.mountpoint for m in mounts.mounts_of_device(dev)]
    return Attachment(
        id=attachment_id,
        state=state,
        daemon_alive=alive,
        loop_devices=loops,
        fuse_mounted=fuse,
        mounted_at=tuple(mounted),
        problems=tuple(problems),
    )


def list_attachments(state_root: str = DEFAULT_STATE_ROOT) -> list[Attachment]:
    """Every attachment under ``state_root``, plus leftovers (loops/mounts) without a directory."""
    layout = Layout(state_root)
    ids = set(layout.ids())
    for li in loopmod.loops_backed_under(layout.root):
        owner = layout.id_of_path(li.backing_file.removesuffix(" (deleted)"))
        if owner:
            ids.add(owner)
    for m in mounts.mounts_under(layout.root):
        owner = layout.id_of_path(m.mountpoint)
        if owner:
            ids.add(owner)
    return [inspect(layout, i) for i in sorted(ids)]


# ---- attach ----------------------------------------------------------------------------------


def attach(
    source: SourceSpec,
    *,
    state_root: str = DEFAULT_STATE_ROOT,
    timeout_s: float = ATTACH_TIMEOUT_S,
    launcher: Sequence[str] = (),
) -> AttachmentState:
    """Attach ``source``; returns its state (``loop_device`` is the block device).

    Idempotent: an attachment of the same source whose daemon is alive and ready is returned
    as is. A broken one (dead daemon) is cleaned up first, unless its device is still mounted
    (DeviceInUseError: unmount it, then retry).

    ``launcher`` empty: the daemon is forked from here (its own session). Otherwise it is the
    argv prefix of a command that starts the daemon elsewhere and returns at once, e.g.
    ``systemd-run --unit=blockyard-attach-{id} --collect --quiet`` (``{id}`` is replaced by
    the attachment id), so the daemon lives outside the caller's cgroup; readiness is then read
    from the state file.
    """
    check_available(source)
    layout = Layout(state_root)
    os.makedirs(layout.root, mode=0o700, exist_ok=True)
    aid = attachment_id(source)
    with op_lock(layout, aid):
        found = inspect(layout, aid)
        if found.daemon_alive and found.state is not None:
            if found.state.source != source.to_dict():
                raise AttachError(
                    f"attachment {aid} serves a different source: {found.state.source}"
                )
            if found.healthy:
                log.info("adopting attachment %s (%s)", aid, found.state.loop_device)
                return found.state
            if found.state.status is Status.STARTING:
                return _wait_ready(layout, aid, timeout_s)
            raise AttachError(
                f"attachment {aid} is {found.health} "
                f"({', '.join(found.problems) or 'no details'}); "
                f"run `blockyard detach {aid}` and attach again"
            )
        if found.state is not None or found.loop_devices or found.fuse_mounted:
            _cleanup_locked(layout, found, force=False)
        if isinstance(source, IscsiSource):
            write_credentials(layout, aid, source.chap, source.target_chap)
        try:
            if launcher:
                return _launch(layout, aid, source, timeout_s, launcher)
            return _spawn(layout, aid, source, timeout_s)
        except BaseException:
            # The daemon takes the file as it starts; one that never did leaves it behind.
            remove_quietly(layout.credentials_file(aid))
            raise


def _daemon_argv(layout: Layout, aid: str, source: SourceSpec) -> list[str]:
    return [
        sys.executable,
        "-m",
        "blockyard.attach.daemon",
        "--state-root",
        layout.root,
        "--id",
        aid,
        "--source",
        json.dumps(source.to_dict()),
    ]


def _launch(
    layout: Layout, aid: str, source: SourceSpec, timeout_s: float, launcher: Sequence[str]
) -> AttachmentState:
    """Start the daemon through ``launcher`` (which returns at once) and wait for the state
    file to say ready."""
    argv = [part.replace("{id}", aid) for part in launcher] + _daemon_argv(layout, aid, source)
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=KILL_WAIT_S,
            check=False,
            cwd="/",
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AttachError(f"the attach launcher {argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise AttachError(
            f"the attach launcher {' '.join(argv[:3])} exited {done.returncode}: "
            f"{done.stderr.strip()[-500:]}"
        )
    deadline = time.monotonic() + timeout_s
    while not daemon_lock_held(layout, aid):
        if time.monotonic() >= deadline:
            raise BlockyardTimeoutError(
                f"the attach daemon of {aid} did not start within {timeout_s:.0f} s "
                f"(launched with {argv[0]}); see the launcher's log"
            )
        time.sleep(0.05)
    try:
        return _wait_ready(layout, aid, max(deadline - time.monotonic(), 1.0))
    except BlockyardTimeoutError:
        _kill_recorded_daemon(layout, aid)
        _cleanup_locked(layout, inspect(layout, aid), force=False)
        raise


def _spawn(layout: Layout, aid: str, source: SourceSpec, timeout_s: float) -> AttachmentState:
    argv = _daemon_argv(layout, aid, source)
    argv.insert(3, "--fork")
    # The child forks the daemon and exits at once, so the daemon is nobody's child here: it
    # outlives us, leaves no zombie in a long-running caller, and is in its own session.
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
        cwd="/",
    )
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=KILL_WAIT_S)
    crash_point("caller_after_spawn")
    assert proc.stdout is not None
    with proc.stdout:
        line = _read_line(proc.stdout.fileno(), timeout_s)
    if line.startswith(READY_PREFIX):
        state = AttachmentState.from_json(line[len(READY_PREFIX) :])
        crash_point("caller_after_ready")
        return state
    # The daemon failed, died or hung: make sure it is gone, then clean up what it left.
    _kill_recorded_daemon(layout, aid)
    reason = line[len(ERROR_PREFIX) :] if line.startswith(ERROR_PREFIX) else None
    _cleanup_locked(layout, inspect(layout, aid), force=False)
    if reason is None:
        reason = "the attach daemon exited without reporting" if line == "" else line
    raise AttachError(f"attaching {source.canonical()} failed: {reason}")


def _kill_recorded_daemon(layout: Layout, aid: str) -> None:
    """SIGKILL the daemon recorded for ``aid`` (pid and start time must match) and wait."""
    try:
        state = read_state(layout, aid)
    except AttachError:
        state = None
    if state is None or not same_process(state.daemon_pid, state.daemon_start_ticks):
        return
    os.kill(state.daemon_pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while same_process(state.daemon_pid, state.daemon_start_ticks) or daemon_lock_held(layout, aid):
        if time.monotonic() >= deadline:
            raise BlockyardTimeoutError(f"attach daemon {state.daemon_pid} survived SIGKILL")
        time.sleep(0.02)


def _read_line(fd: int, timeout_s: float) -> str:
    """One line from the daemon, '' on EOF, 'no answer...' when the timeout runs out."""
    buf = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"no answer within {timeout_s:.0f} s"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return ""
        buf += chunk
        if len(buf) > 1 << 20:
            return "an oversized answer"
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def _wait_ready(layout: Layout, aid: str, timeout_s: float) -> AttachmentState:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = inspect(layout, aid)
        if found.healthy and found.state is not None:
            return found.state
        if not found.daemon_alive:
            break
        time.sleep(0.1)
    raise BlockyardTimeoutError(
        f"attachment {aid} did not become ready within {timeout_s:.0f} s; see "
        f"{layout.log_file(aid)} and run `blockyard detach {aid}`"
    )


def refresh_size(
    attachment_id: str,
    *,
    state_root: str = DEFAULT_STATE_ROOT,
    min_size_bytes: int = 0,
    timeout_s: float = RESIZE_TIMEOUT_S,
) -> int:
    """Have the daemon re-read its source's size (after the volume grew online) and return the
    size its FUSE file now has. Waits until it is at least ``min_size_bytes``; with 0, until the
    daemon has had time to answer. The caller refreshes the loop device (``losetup -c``)."""
    layout = Layout(state_root)
    found = inspect(layout, attachment_id)
    state = found.state
    if state is None or not found.daemon_alive:
        raise AttachmentNotFoundError(f"attachment {attachment_id} has no live daemon")
    if not same_process(state.daemon_pid, state.daemon_start_ticks):
        raise AttachError(f"pid {state.daemon_pid} is no longer the daemon of {attachment_id}")
    os.kill(state.daemon_pid, signal.SIGUSR1)
    start = time.monotonic()
    settle_s = min(timeout_s, RESIZE_SETTLE_S)
    while True:
        time.sleep(0.1)
        current = read_state(layout, attachment_id)
        size = current.size_bytes if current is not None else 0
        elapsed_s = time.monotonic() - start
        if min_size_bytes and size >= min_size_bytes:
            return size
        if not min_size_bytes and elapsed_s >= settle_s:
            return size
        if elapsed_s >= timeout_s:
            raise BlockyardTimeoutError(
                f"attachment {attachment_id} still reports {size} bytes {timeout_s:.0f} s "
                f"after the size refresh, below {min_size_bytes}; did the volume grow? See "
                f"{layout.log_file(attachment_id)}"
            )


# ---- detach ----------------------------------------------------------------------------------


def resolve(target: str, state_root: str = DEFAULT_STATE_ROOT) -> tuple[Attachment, list[str]]:
    """Find the attachment named by ``target`` and the mountpoints the user asked to unmount.

    ``target`` is a mountpoint of a filesystem on an attached device, the device (or one of
    its partitions), an attachment id, or a volume name.
    """
    all_ = list_attachments(state_root)
    path = os.path.abspath(target)
    for a in all_:
        if path in a.mounted_at:
            return a, [path]
    if target.startswith("/dev/"):
        real = os.path.realpath(target)
        for a in all_:
            for dev in a.loop_devices:
                if real == dev or (
                    loopmod.dev_numbers(real) <= loopmod.dev_numbers(dev)
                    and (os.path.basename(real).startswith(os.path.basename(dev) + "p"))
                ):
                    return a, []
    for a in all_:
        if a.id == target:
            return a, []
    by_name = [a for a in all_ if a.state is not None and a.state.volume == target]
    if len(by_name) == 1:
        return by_name[0], []
    if len(by_name) > 1:
        raise AttachError(
            f"volume {target!r} has {len(by_name)} attachments; name one by id: "
            + ", ".join(a.id for a in by_name)
        )
    raise AttachmentNotFoundError(
        f"no attachment matches {target!r}; `blockyard attachments` lists them"
    )


def detach(
    target: str,
    *,
    state_root: str = DEFAULT_STATE_ROOT,
    force: bool = False,
    timeout_s: float = DETACH_TIMEOUT_S,
) -> Attachment:
    """Detach the attachment named by ``target`` (see :func:`resolve`). Idempotent.

    A mountpoint given as ``target`` is unmounted first. Any other mount of the device makes
    detach refuse (DeviceInUseError) unless ``force``, which unmounts them (never lazily: a
    busy filesystem still refuses).
    """
    found, unmount_first = resolve(target, state_root)
    layout = Layout(state_root)
    with op_lock(layout, found.id):
        for mp in unmount_first:
            if mounts.mounts_at(mp):
                mounts.unmount(mp)
        found = inspect(layout, found.id)
        _check_unused(found, force)
        if found.daemon_alive and found.state is not None:
            _stop_daemon(layout, found.state, timeout_s)
            crash_point("caller_detach_after_stop")
        _cleanup_locked(layout, inspect(layout, found.id), force=force)
        return found


def _check_unused(found: Attachment, force: bool) -> None:
    if not found.mounted_at:
        return
    if not force:
        raise DeviceInUseError(
            f"{found.device} ({found.id}) is mounted at {', '.join(found.mounted_at)}; unmount "
            "it (or run `blockyard detach MOUNTPOINT`), or pass --force to unmount it"
        )
    for mp in found.mounted_at:
        mounts.unmount(mp)


def _stop_daemon(layout: Layout, state: AttachmentState, timeout_s: float) -> None:
    """SIGTERM the daemon (if it is still the recorded process) and wait for it to finish."""
    if not same_process(state.daemon_pid, state.daemon_start_ticks):
        return
    os.kill(state.daemon_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not daemon_lock_held(layout, state.id) and not same_process(
            state.daemon_pid, state.daemon_start_ticks
        ):
            return
        refreshed = read_state(layout, state.id)
        if refreshed is not None and refreshed.error and refreshed.status is Status.READY:
            raise DeviceInUseError(
                f"the attach daemon of {state.id} refused to detach: {refreshed.error}"
            )
        time.sleep(0.05)
    raise BlockyardTimeoutError(
        f"the attach daemon of {state.id} (pid {state.daemon_pid}) did not finish detaching in "
        f"{timeout_s:.0f} s; see {layout.log_file(state.id)}"
    )


# ---- cleanup ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CleanupReport:
    adopted: tuple[str, ...]
    removed: tuple[str, ...]
    refused: tuple[str, ...]


def cleanup(state_root: str = DEFAULT_STATE_ROOT, *, force: bool = False) -> CleanupReport:
    """Adopt every healthy attachment and remove what broken ones left; what a restarted
    caller runs first. Attachments whose device is mounted are refused (listed), not touched,
    unless ``force``."""
    layout = Layout(state_root)
    adopted: list[str] = []
    removed: list[str] = []
    refused: list[str] = []
    for a in list_attachments(state_root):
        with op_lock(layout, a.id):
            a = inspect(layout, a.id)
            if a.daemon_alive:
                adopted.append(a.id)
                continue
            try:
                _cleanup_locked(layout, a, force=force)
            except DeviceInUseError as exc:
                refused.append(f"{a.id}: {exc}")
                continue
            removed.append(a.id)
    return CleanupReport(tuple(adopted), tuple(removed), tuple(refused))


def _cleanup_locked(layout: Layout, a: Attachment, *, force: bool) -> None:
    """Remove what a dead daemon left: loop devices, the FUSE mount, the state directory.

    The caller holds the op lock. A live daemon is never cleaned up underneath.
    """
    if daemon_lock_held(layout, a.id):
        raise AttachError(f"attachment {a.id} has a live daemon; detach it instead")
    backing = layout.backing_file(a.id)
    for li in loopmod.loops_backed_by(backing):
        where = [m.mountpoint for m in mounts.mounts_of_device(li.device)]
        if where and not force:
            raise DeviceInUseError(
                f"{li.device} (attachment {a.id}, daemon dead) is still mounted at "
                f"{', '.join(where)}; unmount it and run `blockyard detach {a.id}`"
            )
        for mp in where:
            mounts.unmount(mp)
        loopmod.detach_loop(li.device, backing)
    mp = layout.mountpoint(a.id)
    if mounts.mounts_at(mp):
        mounts.unmount_fuse_stale(mp)
    if os.path.isdir(layout.dir(a.id)):
        remove_state_dir(layout, a.id)
