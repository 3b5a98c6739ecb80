"""The attach daemon: one process per attached volume, serving its FUSE file under a loop device.

Started by :func:`blockyard.attach.manager.attach` as
``python -m blockyard.attach.daemon --state-root ROOT --id ID --source JSON`` in its own session,
so it outlives its caller (a CLI run or a CSI node plugin that may be restarted or upgraded).

Life cycle:

1. take ``ROOT/ID/daemon.lock`` (held until exit: proof of life that survives pid reuse) and
   record ``starting`` in ``state.json``;
2. open the source, FUSE-mount the one-file filesystem on ``ROOT/ID/mnt``, attach
   ``mnt/disk`` to a loop device with direct I/O;
3. record ``ready`` (with the loop device) and print one line ``READY <state json>`` on stdout
   (or ``ERROR <message>`` and exit 1), then close stdout;
4. on SIGUSR1, re-read the source's size (after the volume grew online) and record it in
   ``state.json`` as ``size_bytes``; the caller then runs ``losetup -c`` (see
   :func:`blockyard.attach.manager.refresh_size`);
5. serve until SIGTERM/SIGINT, then detach: refuse (keep serving) while the loop device is
   claimed (mounted, partition mounted, held); else flush, detach the loop device, unmount the
   FUSE file, close the source, remove the state directory, exit 0.

If the FUSE mount disappears underneath it (someone unmounted it), the daemon tears down what is
left and exits. Whatever a crash leaves behind, :func:`blockyard.attach.manager.cleanup` removes.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

from blockyard.attach import loop as loopmod
from blockyard.attach import mounts
from blockyard.attach.errors import AttachError
from blockyard.attach.fusefile import SectorFile, serve
from blockyard.attach.source import IscsiSource, OpenedSource, open_source, source_from_dict
from blockyard.attach.state import (
    AttachmentState,
    Layout,
    Status,
    crash_point,
    proc_start_ticks,
    remove_quietly,
    rmdir_quietly,
    take_credentials,
    write_state,
)
from blockyard.errors import BlockyardError
from blockyard.fileutil import is_atomic_write_temp

log = logging.getLogger("blockyard.attach.daemon")

#: FUSE INIT normally completes in milliseconds; this bounds a wedged kernel or libfuse.
FUSE_INIT_TIMEOUT_S = 20.0
#: How often the serving loop checks that its FUSE thread is still alive.
WATCH_INTERVAL_S = 0.5
#: The FUSE thread must return this soon after its mount is gone.
FUSE_JOIN_TIMEOUT_S = 20.0
LOG_MAX_BYTES = 1 << 20
READY_PREFIX = "READY "
ERROR_PREFIX = "ERROR "


class _Daemon:
    def __init__(self, layout: Layout, attachment_id: str, source_raw: dict[str, object]) -> None:
        self.layout = layout
        self.id = attachment_id
        self.spec = source_from_dict(dict(source_raw))
        self.mountpoint = layout.mountpoint(attachment_id)
        self.backing = layout.backing_file(attachment_id)
        self.opened: OpenedSource | None = None
        self.fuse_thread: threading.Thread | None = None
        self.fuse_error: BaseException | None = None
        self.loop: str | None = None
        self.stop = threading.Event()
        self.resize = threading.Event()
        self.file: SectorFile | None = None
        self.state: AttachmentState | None = None

    # ---- start -------------------------------------------------------------------------------

    def record(self, **changes: object) -> None:
        assert self.state is not None
        self.state = self.state.with_(**changes)
        write_state(self.layout, self.state)

    def start(self) -> AttachmentState:
        pid = os.getpid()
        ticks = proc_start_ticks(pid)
        assert ticks is not None, "our own /proc entry is missing"
        portals = list(self.spec.portals) if isinstance(self.spec, IscsiSource) else []
        iqn = self.spec.iqn if isinstance(self.spec, IscsiSource) else None
        self.state = AttachmentState(
            id=self.id,
            volume=self.spec.volume,
            source=self.spec.to_dict(),
            fuse_mountpoint=self.mountpoint,
            backing_file=self.backing,
            daemon_pid=pid,
            daemon_start_ticks=ticks,
            started_at=time.time(),
            status=Status.STARTING,
            portals=portals,
            iqn=iqn,
        )
        write_state(self.layout, self.state)
        crash_point("daemon_after_state")

        # CHAP credentials come in a file the caller wrote (removed as it is read), never in
        # argv or the state file.
        chap, target_chap = take_credentials(self.layout, self.id)
        if isinstance(self.spec, IscsiSource) and chap is not None:
            self.spec = replace(self.spec, chap=chap, target_chap=target_chap)
        self.opened = open_source(self.spec)
        device = self.opened.device
        self.record(size_bytes=device.block_count * device.logical_block_size)
        crash_point("daemon_after_open")

        self.file = SectorFile(device, name=self.spec.volume)
        self._mount_fuse(self.file)
        crash_point("daemon_after_fuse")

        info = loopmod.attach_loop(self.backing, direct_io=True)
        self.loop = info.device
        crash_point("daemon_after_loop")
        self.record(loop_device=info.device, status=Status.READY)
        log.info(
            "attached %s as %s (direct I/O %s)", self.spec.canonical(), info.device, info.direct_io
        )
        crash_point("daemon_after_ready")
        return self.state

    def _mount_fuse(self, file: SectorFile) -> None:
        os.makedirs(self.mountpoint, mode=0o700, exist_ok=True)
        if mounts.mounts_at(self.mountpoint):
            raise AttachError(
                f"{self.mountpoint} is already mounted; run `blockyard detach {self.id}`"
            )
        ready = threading.Event()

        def run() -> None:
            try:
                serve(file, self.mountpoint, fsname=f"blockyard:{self.id}", on_init=ready.set)
            except BaseException as exc:  # noqa: BLE001  # handed to the main thread to report
                self.fuse_error = exc
            finally:
                ready.set()
                self.stop.set()

        self.fuse_thread = threading.Thread(target=run, name="fuse", daemon=True)
        self.fuse_thread.start()
        if not ready.wait(FUSE_INIT_TIMEOUT_S):
            raise AttachError(
                f"FUSE did not initialise {self.mountpoint} in {FUSE_INIT_TIMEOUT_S} s"
            )
        if self.fuse_error is not None or not self.fuse_thread.is_alive():
            raise AttachError(f"FUSE mount of {self.mountpoint} failed: {self.fuse_error}")

    # ---- serve -------------------------------------------------------------------------------

    def serve_until_stopped(self) -> None:
        while True:
            self.stop.wait(WATCH_INTERVAL_S)
            if self.fuse_thread is not None and not self.fuse_thread.is_alive():
                log.error("the FUSE mount %s went away; tearing down", self.mountpoint)
                return
            if self.resize.is_set():
                self.resize.clear()
                self._refresh_size()
            if not self.stop.is_set():
                continue
            self.stop.clear()
            assert self.loop is not None
            busy = _claimed(self.loop)
            if busy:
                log.warning("detach refused: %s", busy)
                self.record(error=f"detach refused: {busy}")
                continue
            return

    def _refresh_size(self) -> None:
        """Re-read the source's capacity and grow the FUSE file to it."""
        assert self.file is not None and self.opened is not None
        refresh = getattr(self.opened.device, "refresh_capacity", None)
        try:
            if callable(refresh):
                refresh()
            size = self.file.refresh_size()
        except (BlockyardError, OSError) as exc:
            log.warning("re-reading the size of %s failed: %s", self.spec.canonical(), exc)
            return
        log.info("%s is %d bytes", self.spec.canonical(), size)
        self.record(size_bytes=size)

    # ---- teardown ----------------------------------------------------------------------------

    def teardown(self) -> None:
        """Undo whatever start() got to, in reverse; every step tolerates its undo being done."""
        if self.state is not None:
            self.record(status=Status.DETACHING)
        if self.opened is not None:
            try:
                self.opened.device.flush()
            except BlockyardError:
                log.exception("flush before detach failed")
        crash_point("daemon_detach_after_flush")
        for info in loopmod.loops_backed_by(self.backing):
            loopmod.detach_loop(info.device, self.backing)
        crash_point("daemon_detach_after_loop")
        if mounts.mounts_at(self.mountpoint):
            try:
                mounts.unmount(self.mountpoint)
            except AttachError as exc:
                log.warning("unmount %s failed (%s); detaching lazily", self.mountpoint, exc)
                mounts.unmount_fuse_stale(self.mountpoint)
        crash_point("daemon_detach_after_unmount")
        if self.fuse_thread is not None:
            self.fuse_thread.join(FUSE_JOIN_TIMEOUT_S)
        if self.opened is not None:
            self.opened.close()
            self.opened = None
        remove_state_dir(self.layout, self.id)


def _claimed(device: str) -> str | None:
    """Why ``device`` cannot be detached now, or None."""
    where = [m.mountpoint for m in mounts.mounts_of_device(device)]
    if where:
        return f"{device} is mounted at {', '.join(where)}"
    held = loopmod.holders(device)
    if held:
        return f"{device} is held by {', '.join(held)}"
    if loopmod.open_exclusive_busy(device):
        return f"{device} is in use (mounted in another namespace or opened exclusively)"
    return None


def remove_state_dir(layout: Layout, attachment_id: str) -> None:
    """Remove an attachment's directory; never descends into a (possibly live) mountpoint."""
    d = layout.dir(attachment_id)
    remove_quietly(layout.state_file(attachment_id))
    if not rmdir_quietly(layout.mountpoint(attachment_id)):
        raise AttachError(f"{layout.mountpoint(attachment_id)} is still mounted or not empty")
    remove_quietly(layout.log_file(attachment_id))
    remove_quietly(layout.credentials_file(attachment_id))
    bases = [
        os.path.basename(layout.state_file(attachment_id)),
        os.path.basename(layout.credentials_file(attachment_id)),
    ]
    for entry in os.listdir(d) if os.path.isdir(d) else []:
        # A process killed while replacing one of these files leaves its temporary file behind.
        if any(is_atomic_write_temp(entry, base) for base in bases):
            remove_quietly(os.path.join(d, entry))
    remove_quietly(layout.lock_file(attachment_id))
    rmdir_quietly(d)


def _setup_logging(layout: Layout, attachment_id: str) -> None:
    handler = logging.handlers.RotatingFileHandler(
        layout.log_file(attachment_id), maxBytes=LOG_MAX_BYTES, backupCount=0
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def _say(line: str) -> None:
    """Tell the caller; it may be gone already (crashed or killed), which is fine."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError) as exc:
        log.info("caller is gone (%s); state on disk is authoritative", exc)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    except OSError as exc:
        log.warning("could not detach stdout: %s", exc)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="blockyard-attach-daemon")
    ap.add_argument("--state-root", required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--source", required=True, help="source spec as JSON")
    ap.add_argument("--fork", action="store_true", help="fork; the parent exits at once")
    args = ap.parse_args(argv)
    if args.fork:
        # No threads exist yet, so forking here is safe. The parent's exit lets the caller reap
        # it; the child is re-parented and keeps the caller's stdout pipe for the ready line.
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
    layout = Layout(args.state_root)
    d = layout.dir(args.id)
    os.makedirs(d, mode=0o700, exist_ok=True)
    lock_fd = os.open(layout.lock_file(args.id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _say(f"{ERROR_PREFIX}another attach daemon already serves {args.id}")
        return 1
    _setup_logging(layout, args.id)
    # A Python handler (not SIG_DFL) also keeps libfuse from installing its own, which would
    # unmount the FUSE file while the loop device still uses it.
    daemon = _Daemon(layout, args.id, json.loads(args.source))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda *_: daemon.resize.set())
    try:
        state = daemon.start()
    except (BlockyardError, OSError) as exc:
        log.exception("attach failed")
        _say(f"{ERROR_PREFIX}{exc}")
        try:
            daemon.teardown()
        except (BlockyardError, OSError):
            log.exception("cleanup after the failed attach failed too")
        return 1
    _say(READY_PREFIX + json.dumps(json.loads(state.to_json())))
    daemon.serve_until_stopped()
    try:
        daemon.teardown()
    except (BlockyardError, OSError):
        log.exception("detach failed")
        return 1
    log.info("detached %s", args.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
