"""``blockyard attach``, ``blockyard detach`` and ``blockyard attachments``.

Attach exposes a volume as a local block device (/dev/loopN over a FUSE file served by a
per-volume daemon, see :mod:`blockyard.attach.manager`) and optionally mounts a filesystem on it.
Filesystems are created only on a device that has none (checked with blkid): an existing
filesystem is checked (fsck, no repair) and mounted, never reformatted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

from blockyard import tls
from blockyard.attach import manager, mounts
from blockyard.attach.errors import (
    AttachError,
    AttachmentNotFoundError,
    SourceUnavailableError,
    ToolError,
)
from blockyard.attach.loop import MKFS_TIMEOUT_S, run_tool
from blockyard.attach.source import (
    PORTALS_MAX_COUNT,
    IscsiSource,
    LocalSource,
    SourceSpec,
    check_address,
)
from blockyard.attach.state import DEFAULT_STATE_ROOT
from blockyard.errors import InvalidArgumentError, TlsConfigError

FILESYSTEMS = ("ext4", "xfs")
#: blkid exit status when it finds no signature (blkid(8)).
_BLKID_NOTHING_FOUND = 2
#: e2fsck -n: 0 clean, 1 errors corrected (impossible with -n), 4 errors left uncorrected.
_FSCK_OK = (0,)
#: Resolving a volume through the management API.
_SERVER_TIMEOUT_S = 30.0


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "attach",
        help="expose a volume as a local block device (FUSE + loop), optionally mounted",
        description="Attach a volume and print its device. The attachment is served by its own "
        "daemon process, which outlives this command.",
    )
    p.add_argument("name", nargs="?", help="volume name (with --server or --master)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--server", metavar="HOST:PORT", help="volume server management API")
    how.add_argument(
        "--master",
        metavar="HOST:PORT[,HOST:PORT]",
        help="resolve the volume through the master and attach every copy's portals "
        "(primary first): multipath that follows a failover",
    )
    how.add_argument("--portal", metavar="HOST:PORT", action="append", help="iSCSI portal")
    how.add_argument("--local", metavar="DATA_DIR/NAME", help="engine volume on this machine")
    p.add_argument("--iqn", help="target IQN (with --portal)")
    p.add_argument("--lun", type=int, default=0, help="LUN (with --portal; default 0)")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--fs",
        nargs=2,
        metavar=("ext4|xfs", "MOUNTPOINT"),
        help="mount a filesystem of this type (created only if the device has none)",
    )
    what.add_argument("--block", action="store_true", help="only attach (the default)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_ROOT, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    tls.add_arguments(p, role="dial")  # for --server and --master
    p.set_defaults(func=_attach)

    p = verbs.add_parser(
        "detach",
        help="unmount (if a mountpoint is given) and detach an attached volume",
    )
    p.add_argument("target", help="MOUNTPOINT, DEVICE, volume NAME or attachment id")
    p.add_argument("--force", action="store_true", help="unmount filesystems on the device first")
    p.add_argument("--state-dir", default=DEFAULT_STATE_ROOT, help=argparse.SUPPRESS)
    p.set_defaults(func=_detach)

    p = verbs.add_parser("attachments", help="list attached volumes")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--cleanup", action="store_true", help="also remove what dead attach daemons left behind"
    )
    p.add_argument("--state-dir", default=DEFAULT_STATE_ROOT, help=argparse.SUPPRESS)
    p.set_defaults(func=_attachments)


def _source(args: argparse.Namespace) -> SourceSpec:
    security = tls.from_args(args)
    if not (args.server or args.master) and (security.tls is not None or security.insecure):
        raise TlsConfigError("the --tls-* flags and --insecure go with --server or --master")
    if args.local:
        if args.name:
            raise InvalidArgumentError("--local takes DATA_DIR/NAME; drop the extra NAME")
        data_dir, _, name = str(args.local).rstrip("/").rpartition("/")
        if not data_dir or not name:
            raise InvalidArgumentError(f"--local {args.local!r}: use DATA_DIR/NAME")
        return LocalSource(data_dir=data_dir, name=name)
    if args.portal:
        if not args.iqn:
            raise InvalidArgumentError("--portal needs --iqn TARGET_IQN")
        return IscsiSource(
            portals=tuple(args.portal), iqn=args.iqn, lun=args.lun, volume_name=args.name or ""
        )
    if not args.name:
        raise InvalidArgumentError(
            f"{'--master' if args.master else '--server'} needs the volume NAME"
        )
    if args.master:
        return _resolve_on_master(args.master, args.name, security)
    return _resolve_on_server(check_address(args.server), args.name, security)


def _resolve_on_master(masters: str, name: str, security: tls.TransportSecurity) -> SourceSpec:
    """Every copy's portals, the primary's first, behind the one target name all copies export:
    the initiator logs in to each, uses the active/optimized path and moves to the path that
    turns active/optimized when a replica is promoted (ALUA, SPC-4 §5.15) — what CSI's
    NodeStage gets from ControllerPublishVolume."""
    from blockyard.master.client import MasterClient  # noqa: PLC0415  # grpc is heavy

    async def lookup() -> SourceSpec:
        async with MasterClient(masters, timeout_s=_SERVER_TIMEOUT_S, security=security) as c:
            info = await c.get_volume(name)
        copies = sorted(info.copies, key=lambda c: c.server_id != info.primary_server_id)
        portals = tuple(dict.fromkeys(p for c in copies for p in c.addresses.iscsi_portals))
        if not info.iqn or not portals:
            raise AttachError(
                f"volume {name!r} is not exported yet (status {info.status or 'unknown'}, no "
                f"{'target name' if not info.iqn else 'portal'} reported); wait until `blockyard "
                f"volume get {name} --master {masters}` shows its primary, then attach again"
            )
        return IscsiSource(
            portals=portals[:PORTALS_MAX_COUNT], iqn=info.iqn, lun=0, volume_name=name
        )

    return asyncio.run(lookup())


def _resolve_on_server(server: str, name: str, security: tls.TransportSecurity) -> SourceSpec:
    """Ask the volume server where the volume is exported (its portals, IQN and LUN)."""
    try:
        from blockyard.server.client import VolumeServerClient  # noqa: PLC0415  # grpc is heavy
    except ImportError as exc:
        raise SourceUnavailableError(
            f"--server is not available yet: the management API client cannot be imported ({exc})"
        ) from exc

    async def lookup() -> SourceSpec:
        client = VolumeServerClient(server, timeout_s=_SERVER_TIMEOUT_S, security=security)
        async with client:
            desc = await client.get_volume(name)
        export = desc.export
        if not export.portals:
            raise AttachError(f"volume {name!r} on {server} is not exported on any portal")
        return IscsiSource(
            portals=tuple(p.address for p in export.portals),
            iqn=export.iqn,
            lun=export.lun,
            volume_name=name,
        )

    return asyncio.run(lookup())


def _has_filesystem(device: str) -> str | None:
    """The filesystem type on ``device``, or None if blkid finds no signature at all."""
    proc = run_tool(["blkid", "-p", "-o", "value", "-s", "TYPE", device], check=False)
    if proc.returncode == _BLKID_NOTHING_FOUND:
        return None
    if proc.returncode != 0:
        raise ToolError(f"blkid -p {device} failed: {proc.stderr.strip()}")
    # A partition table or another non-filesystem signature also means "not empty".
    return proc.stdout.strip() or "unknown (partition table or other signature)"


def _mount_fs(device: str, fstype: str, mountpoint: str) -> str:
    found = _has_filesystem(device)
    if found is None:
        argv = ["mkfs.ext4", "-q", device] if fstype == "ext4" else ["mkfs.xfs", "-q", device]
        run_tool(argv, timeout_s=MKFS_TIMEOUT_S)
        action = f"created {fstype}"
    elif found != fstype:
        raise AttachError(
            f"{device} already holds {found}, not {fstype}; it is never reformatted. Attach "
            f"with --fs {found} or --block"
        )
    else:
        _fsck(device, fstype)
        action = f"checked existing {fstype}"
    os.makedirs(mountpoint, exist_ok=True)
    current = mounts.mounts_at(os.path.abspath(mountpoint))
    if current:
        if any(m.source == device for m in current):
            return f"{action}; already mounted at {mountpoint}"
        raise AttachError(f"{mountpoint} is already a mountpoint of {current[-1].source}")
    run_tool(["mount", "-t", fstype, device, mountpoint])
    return f"{action}; mounted at {mountpoint}"


def _fsck(device: str, fstype: str) -> None:
    """rds-csi: check an existing filesystem before mounting it (read-only, no repair)."""
    argv = ["e2fsck", "-f", "-n", device] if fstype == "ext4" else ["xfs_repair", "-n", device]
    proc = run_tool(argv, timeout_s=MKFS_TIMEOUT_S, check=False)
    if proc.returncode not in _FSCK_OK:
        raise AttachError(
            f"{' '.join(argv)} found problems (exit {proc.returncode}); the filesystem was not "
            f"mounted. Repair it on {device} by hand: {proc.stdout.strip()[-500:]}"
        )


def _attach(args: argparse.Namespace) -> int:
    fstype, mountpoint = args.fs if args.fs else (None, None)
    if fstype is not None and fstype not in FILESYSTEMS:
        raise InvalidArgumentError(f"--fs {fstype}: use one of {', '.join(FILESYSTEMS)}")
    source = _source(args)
    state = manager.attach(source, state_root=args.state_dir)
    assert state.loop_device is not None
    note = ""
    if fstype is not None and mountpoint is not None:
        note = _mount_fs(state.loop_device, fstype, mountpoint)
    if args.json:
        out: dict[str, Any] = {"id": state.id, "device": state.loop_device, "volume": state.volume}
        if mountpoint is not None:
            out |= {"fs": fstype, "mountpoint": os.path.abspath(mountpoint)}
        print(json.dumps(out, indent=2))
    else:
        print(state.loop_device)
        if note:
            print(note)
    return 0


def _detach(args: argparse.Namespace) -> int:
    try:
        found = manager.detach(args.target, state_root=args.state_dir, force=args.force)
    except AttachmentNotFoundError:
        # Idempotent, as CSI NodeUnstage retries need: what is not attached is detached.
        print(f"{args.target} is not attached; nothing to do")
        return 0
    print(f"detached {found.id} ({found.device or 'no device'})")
    return 0


def _attachments(args: argparse.Namespace) -> int:
    if args.cleanup:
        report = manager.cleanup(args.state_dir)
        for line in report.refused:
            print(f"refused: {line}")
    found = manager.list_attachments(args.state_dir)
    if args.json:
        print(json.dumps([a.to_dict() for a in found], indent=2))
        return 0
    print(f"{'ID':<52} {'DEVICE':<12} {'HEALTH':<10} {'PID':>7}  MOUNTED AT")
    for a in found:
        pid = a.state.daemon_pid if a.state else "-"
        print(
            f"{a.id:<52} {a.device or '-':<12} {a.health:<10} {pid:>7}  "
            f"{', '.join(a.mounted_at) or '-'}"
        )
    return 0
