"""File system and device operations of the Node service, each external tool bounded.

Rules (rds-csi): a file system is created only on a device where ``blkid`` finds no signature
at all, never over anything; an existing one is checked read-only (``e2fsck -f -n`` /
``xfs_repair -n``) before it is mounted and refused when damaged; a raw block volume is
published as a device node made with mknod, never a bind mount of ``/dev``.

Blocking: every function here runs tools synchronously; the service calls them off the event
loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Final

from blockyard.attach.errors import ToolError
from blockyard.attach.loop import TOOL_TIMEOUT_S, run_tool
from blockyard.csi.node_errors import (
    FilesystemDamagedError,
    FilesystemMismatchError,
    NodePreconditionError,
    TargetPathError,
)

log = logging.getLogger("blockyard.csi.node_fs")

#: blkid(8): exit status 2 means no signature was found.
BLKID_NOTHING_FOUND: Final = 2
#: Bound on mkfs, fsck and online grow (large volumes take a while; a wedged device must not
#: hold the RPC forever).
FS_TOOL_TIMEOUT_S: Final = 300.0


def probe_fs(device: str) -> str | None:
    """The signature type on ``device`` (a file system, or anything else blkid knows), or
    None when the device is blank."""
    proc = run_tool(["blkid", "-p", "-o", "value", "-s", "TYPE", device], check=False)
    if proc.returncode == BLKID_NOTHING_FOUND:
        return None
    if proc.returncode != 0:
        # blkid -p answers 0 for partition tables too, without TYPE; anything else is an error.
        run_tool(["blkid", "-p", device])
    return proc.stdout.strip() or "unknown (a partition table or another signature)"


def mkfs(device: str, fs_type: str) -> None:
    argv = ["mkfs.ext4", "-q", device] if fs_type == "ext4" else ["mkfs.xfs", "-q", device]
    run_tool(argv, timeout_s=FS_TOOL_TIMEOUT_S)


#: What the checkers print when the journal/log holds changes a mount would replay first:
#: their read-only verdict is then meaningless (a crash-consistent snapshot or an unclean
#: shutdown), not a sign of damage.
_NEEDS_REPLAY: Final = ("valuable metadata changes in a log", "skipping journal recovery")


def _check(device: str, fs_type: str) -> tuple[list[str], int, str]:
    argv = ["e2fsck", "-f", "-n", device] if fs_type == "ext4" else ["xfs_repair", "-n", device]
    proc = run_tool(argv, timeout_s=FS_TOOL_TIMEOUT_S, check=False)
    return argv, proc.returncode, proc.stdout + proc.stderr


def fsck(device: str, fs_type: str, replay_at: str) -> None:
    """Check ``fs_type`` on ``device`` without repairing; raise FilesystemDamagedError.

    A journal or log awaiting replay is replayed first by mounting the file system at
    ``replay_at`` and unmounting it (what the kernel does on any mount), then checked again.
    """
    argv, rc, output = _check(device, fs_type)
    if rc != 0 and any(marker in output for marker in _NEEDS_REPLAY):
        log.info("%s: %s log needs replay; mounting once to replay it", device, fs_type)
        mount(device, replay_at, fs_type, mount_options(fs_type, (), read_only=False))
        unmount(replay_at)
        argv, rc, output = _check(device, fs_type)
    if rc != 0:
        repair = f"e2fsck -f -y {device}" if fs_type == "ext4" else f"xfs_repair {device}"
        detail = output.strip()[-600:]
        raise FilesystemDamagedError(
            f"{' '.join(argv)} found problems (exit {rc}); the {fs_type} file "
            f"system was not mounted, to keep the damage from spreading. To repair: attach the "
            f"volume on a node by hand (`blockyard attach --portal ... --iqn ...`), run "
            f"`{repair}`, detach it, then let kubelet retry. fsck said: {detail}"
        )


def prepare_filesystem(device: str, fs_type: str, mountpoint: str, *, read_only: bool) -> str:
    """Make ``device`` hold ``fs_type``: create it on a blank device, check an existing one.
    Returns what was done, for the log."""
    found = probe_fs(device)
    if found is None:
        if read_only:
            raise NodePreconditionError(
                f"{device} is blank and the volume is staged read-only, so no {fs_type} file "
                "system can be created on it; stage it read-write once to format it"
            )
        mkfs(device, fs_type)
        return f"created {fs_type}"
    if found != fs_type:
        raise FilesystemMismatchError(
            f"{device} already holds {found}, not {fs_type}; blockyard never reformats a "
            f"device that holds data. Use a StorageClass/capability with fsType {found} (or "
            "volumeMode: Block), or wipe the volume deliberately yourself"
        )
    fsck(device, fs_type, mountpoint)
    return f"checked existing {fs_type}"


def mount_options(fs_type: str, flags: tuple[str, ...], read_only: bool) -> list[str]:
    opts = [f for flag in flags for f in flag.split(",") if f]
    if fs_type == "xfs" and "nouuid" not in opts:
        # A restored snapshot or a clone carries its source's UUID; XFS refuses to mount a
        # second file system with a UUID already mounted on the node.
        opts.append("nouuid")
    if read_only and "ro" not in opts:
        opts.append("ro")
    return opts


def mount(device: str, path: str, fs_type: str, options: list[str]) -> None:
    argv = ["mount", "-t", fs_type]
    if options:
        argv += ["-o", ",".join(options)]
    run_tool([*argv, device, path], timeout_s=TOOL_TIMEOUT_S)


def bind_mount(source: str, target: str, *, read_only: bool) -> None:
    run_tool(["mount", "--bind", source, target])
    if read_only:
        try:
            run_tool(["mount", "-o", "remount,bind,ro", target])
        except ToolError:
            # Never leave a writable mount behind for a read-only publish.
            run_tool(["umount", target], check=False)
            raise


def unmount(path: str) -> None:
    run_tool(["umount", path])


def grow_filesystem(device: str, fs_type: str, mountpoint: str) -> None:
    if fs_type == "xfs":
        run_tool(["xfs_growfs", mountpoint], timeout_s=FS_TOOL_TIMEOUT_S)
    else:
        run_tool(["resize2fs", device], timeout_s=FS_TOOL_TIMEOUT_S)


def device_size(device: str) -> int:
    """Size in bytes of a block device (or of the device behind a device node)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def device_numbers(device: str) -> tuple[int, int]:
    """``(major, minor)`` of a block device path; raises NodePreconditionError when it is
    gone or not a block device."""
    try:
        st = os.stat(device)
    except FileNotFoundError as exc:
        raise NodePreconditionError(
            f"the volume's device {device} is gone; unstage the volume and stage it again"
        ) from exc
    if not stat.S_ISBLK(st.st_mode):
        raise NodePreconditionError(f"{device} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


@dataclass(frozen=True, slots=True)
class BlockTarget:
    """What is at a block publish target path now."""

    exists: bool
    is_dir: bool = False
    rdev: tuple[int, int] | None = None
    empty_file: bool = False


def inspect_block_target(path: str) -> BlockTarget:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return BlockTarget(exists=False)
    if stat.S_ISDIR(st.st_mode):
        return BlockTarget(exists=True, is_dir=True)
    if stat.S_ISBLK(st.st_mode):
        return BlockTarget(exists=True, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
    return BlockTarget(exists=True, empty_file=stat.S_ISREG(st.st_mode) and st.st_size == 0)


def publish_block(target: str, numbers: tuple[int, int]) -> str:
    """Make ``target`` a block device node with ``numbers``; idempotent. The target must be
    a file path: an existing directory there is refused, never replaced."""
    found = inspect_block_target(target)
    if found.is_dir:
        raise TargetPathError(
            f"target_path {target} is a directory, but a raw block volume is published as a "
            "device node (a file). Remove the directory (kubelet creates only the parent) and "
            "retry"
        )
    if found.rdev == numbers:
        return "already published"
    if found.exists and not (found.rdev is not None or found.empty_file):
        raise TargetPathError(
            f"target_path {target} exists and is neither a device node nor an empty file; "
            "refusing to replace it. Remove it and retry"
        )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if found.exists:
        os.unlink(target)
    os.mknod(target, stat.S_IFBLK | 0o660, os.makedev(*numbers))
    return f"device node {numbers[0]}:{numbers[1]} created"


def remove_target(path: str) -> None:
    """Remove an unpublished target: a directory (it must be empty: whatever is inside is not
    ours to delete) or a file/device node. A missing path is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise TargetPathError(
                f"{path} is not empty after unmounting ({exc.strerror}); files were written "
                "into the target directory itself, not the volume. Inspect and remove them"
            ) from exc
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
