"""``blockyard volume``: manage volumes in a local data directory or on a volume server.

With ``--data-dir`` these commands open volume files directly; while ``blockyard serve`` runs on
the same directory the volume file lock refuses them with a message pointing at the management
API. With ``--server HOST:PORT`` they go through that server's management API instead (restore
needs ``--data-dir``: the API has no restore). A server off loopback is dialed with mutual TLS
(``--tls-cert``, ``--tls-key``, ``--tls-ca``) or, explicitly, ``--insecure``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from blockyard import tls
from blockyard.cli.sizes import format_size, parse_size
from blockyard.engine import VolumeInfo, VolumeStore
from blockyard.errors import InvalidArgumentError, TlsConfigError
from blockyard.server.backend import SnapshotDescription, SnapshotRef, VolumeDescription
from blockyard.server.client import VolumeServerClient

T = TypeVar("T")


def _add_location(sp: argparse.ArgumentParser, *, server: bool = True) -> None:
    where = sp.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", help="directory holding the volumes")
    if server:
        where.add_argument(
            "--server", metavar="HOST:PORT", help="a volume server's management API address"
        )
        tls.add_arguments(sp, role="dial")


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("volume", help="create, list, delete, grow, snapshot and clone volumes")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        _add_location(sp)
        sp.set_defaults(func=func)
        return sp

    sp = add("create", "create a volume (all zeros, thin-provisioned)", _create)
    sp.add_argument("name")
    sp.add_argument("--size", required=True, help="e.g. 1GiB, 512MiB")
    sp.add_argument("--wal-size", help="WAL size (default: size/16 within 1-64 MiB)")
    sp.add_argument("--json", action="store_true")

    sp = add("delete", "delete a volume and every file it owns (idempotent)", _delete)
    sp.add_argument("name")

    sp = add("list", "list volumes", _list)
    sp.add_argument("--json", action="store_true")

    sp = add("info", "show one volume", _info)
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true")

    sp = add("grow", "grow a volume (shrinking is refused)", _grow)
    sp.add_argument("name")
    sp.add_argument("--size", required=True)

    sp = add("clone", "create a new volume from a snapshot", _clone)
    sp.add_argument("source")
    sp.add_argument("snapshot")
    sp.add_argument("name")

    snap = sub.add_parser("snapshot", help="create, list, delete or restore snapshots")
    ssub = snap.add_subparsers(dest="snapshot_action", required=True, metavar="ACTION")
    for action, help_, func in (
        ("create", "take a snapshot", _snap_create),
        ("delete", "delete a snapshot", _snap_delete),
        ("restore", "make the volume read as the snapshot (volume must be idle)", _snap_restore),
    ):
        sp = ssub.add_parser(action, help=help_)
        _add_location(sp, server=action != "restore")
        sp.add_argument("volume")
        sp.add_argument("snapshot")
        sp.set_defaults(func=func)
    sp = ssub.add_parser("list", help="list a volume's snapshots")
    _add_location(sp)
    sp.add_argument("volume")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_snap_list)


def _store(args: argparse.Namespace) -> VolumeStore:
    security = tls.from_args(args)
    if security.tls is not None or security.insecure:
        raise TlsConfigError("the --tls-* flags and --insecure go with --server, not --data-dir")
    return VolumeStore(args.data_dir)


def _remote(args: argparse.Namespace, fn: Callable[[VolumeServerClient], Awaitable[T]]) -> T:
    security = tls.from_args(args)

    async def main() -> T:
        async with VolumeServerClient(args.server, security=security) as client:
            return await fn(client)

    return asyncio.run(main())


def _remote_dict(d: VolumeDescription) -> dict[str, Any]:
    return {
        "name": d.name,
        "uuid": str(d.uuid),
        "size_bytes": d.size_bytes,
        "epoch": d.epoch,
        "role": d.role.name.lower(),
        "allocated_bytes": d.allocated_bytes,
        "snapshot_count": d.snapshot_count,
        "iqn": d.export.iqn,
        "lun": d.export.lun,
        "naa_id": d.export.naa_id,
        "portals": [
            {"address": p.address, "portal_group_tag": p.portal_group_tag,
             "state": p.state.name.lower()}
            for p in d.export.portals
        ],
    }  # fmt: skip


def _print_remote(descs: list[VolumeDescription], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_remote_dict(d) for d in descs], indent=2))
        return
    print(f"{'NAME':<32} {'SIZE':>10} {'USED':>10} {'SNAPS':>5} {'ROLE':<10} {'EPOCH':>5}  IQN")
    for d in descs:
        print(
            f"{d.name:<32} {format_size(d.size_bytes):>10} {format_size(d.allocated_bytes):>10} "
            f"{d.snapshot_count:>5} {d.role.name.lower():<10} {d.epoch:>5}  {d.export.iqn}"
        )


def _snap_dict(s: SnapshotDescription) -> dict[str, Any]:
    return {
        "name": s.name,
        "uuid": str(s.uuid),
        "size_bytes": s.size_bytes,
        "created_ns": s.created_ns,
        "delta_bytes": s.delta_bytes,
    }


def _info_dict(info: VolumeInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "uuid": str(info.uuid),
        "size_bytes": info.size_bytes,
        "epoch": info.epoch,
        "role": info.role.name.lower(),
        "wal_size_bytes": info.wal_size_bytes,
        "allocated_bytes": info.allocated_bytes,
        "snapshot_count": info.snapshot_count,
    }


def _print_infos(infos: list[VolumeInfo], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_info_dict(i) for i in infos], indent=2))
        return
    print(f"{'NAME':<32} {'SIZE':>10} {'USED':>10} {'SNAPS':>5} {'ROLE':<10} {'EPOCH':>5}  UUID")
    for i in infos:
        print(
            f"{i.name:<32} {format_size(i.size_bytes):>10} {format_size(i.allocated_bytes):>10} "
            f"{i.snapshot_count:>5} {i.role.name.lower():<10} {i.epoch:>5}  {i.uuid}"
        )


def _create(args: argparse.Namespace) -> int:
    if args.server:
        if args.wal_size:
            raise InvalidArgumentError("--wal-size needs --data-dir; the server picks the WAL size")
        size = parse_size(args.size)
        desc = _remote(args, lambda c: c.create_volume(args.name, size))
        if args.json:
            print(json.dumps(_remote_dict(desc), indent=2))
        else:
            print(
                f"created volume {desc.name} ({format_size(desc.size_bytes)}, uuid {desc.uuid}), "
                f"iSCSI {desc.export.iqn} at {', '.join(p.address for p in desc.export.portals)}"
            )
        return 0
    store = _store(args)
    wal = parse_size(args.wal_size) if args.wal_size else None
    vol = store.create(args.name, parse_size(args.size), wal_size_bytes=wal)
    vol.close()
    info = store.info(args.name)
    if args.json:
        print(json.dumps(_info_dict(info), indent=2))
    else:
        print(f"created volume {info.name} ({format_size(info.size_bytes)}, uuid {info.uuid})")
    return 0


def _delete(args: argparse.Namespace) -> int:
    if args.server:
        existed = _remote(args, lambda c: c.delete_volume(args.name)).existed
    else:
        store = _store(args)
        existed = store.exists(args.name)
        store.delete(args.name)
    # Idempotent (exit 0 either way), but say which it was: a typo must not look like success.
    if existed:
        print(f"deleted volume {args.name}")
    else:
        print(f"no volume {args.name}: nothing to delete")
    return 0


def _list(args: argparse.Namespace) -> int:
    if args.server:
        _print_remote(_remote(args, lambda c: c.list_all_volumes()), args.json)
        return 0
    _print_infos(_store(args).list(), args.json)
    return 0


def _info(args: argparse.Namespace) -> int:
    if args.server:
        _print_remote([_remote(args, lambda c: c.get_volume(args.name))], args.json)
        return 0
    _print_infos([_store(args).info(args.name)], args.json)
    return 0


def _grow(args: argparse.Namespace) -> int:
    if args.server:
        size = parse_size(args.size)
        desc = _remote(args, lambda c: c.expand_volume(args.name, size))
        print(f"volume {desc.name} is now {format_size(desc.size_bytes)}")
        return 0
    with _store(args).open(args.name) as vol:
        vol.grow(parse_size(args.size))
        print(f"volume {vol.name} is now {format_size(vol.size_bytes)}")
    return 0


def _clone(args: argparse.Namespace) -> int:
    if args.server:
        source = SnapshotRef(args.source, args.snapshot)
        _remote(args, lambda c: c.clone_volume(args.name, source))
        print(f"cloned {args.source}@{args.snapshot} into volume {args.name}")
        return 0
    store = _store(args)
    with store.open(args.source) as src:
        clone = store.clone(src, args.snapshot, args.name)
        clone.close()
    print(f"cloned {args.source}@{args.snapshot} into volume {args.name}")
    return 0


def _snap_create(args: argparse.Namespace) -> int:
    if args.server:
        snap = _remote(args, lambda c: c.create_snapshot(args.volume, args.snapshot))
        print(f"created snapshot {args.volume}@{snap.name}")
        return 0
    with _store(args).open(args.volume) as vol:
        info = vol.create_snapshot(args.snapshot)
    print(f"created snapshot {args.volume}@{info.name}")
    return 0


def _snap_delete(args: argparse.Namespace) -> int:
    if args.server:
        _remote(args, lambda c: c.delete_snapshot(args.volume, args.snapshot))
        print(f"deleted snapshot {args.volume}@{args.snapshot}")
        return 0
    with _store(args).open(args.volume) as vol:
        vol.delete_snapshot(args.snapshot)
    print(f"deleted snapshot {args.volume}@{args.snapshot}")
    return 0


def _snap_restore(args: argparse.Namespace) -> int:
    with _store(args).open(args.volume) as vol:
        vol.restore_snapshot(args.snapshot)
    print(f"restored volume {args.volume} to snapshot {args.snapshot}")
    return 0


def _snap_list(args: argparse.Namespace) -> int:
    if args.server:
        remote = _remote(args, lambda c: c.list_snapshots(args.volume))
        if args.json:
            print(json.dumps([_snap_dict(s) for s in remote], indent=2))
            return 0
        print(f"{'SNAPSHOT':<32} {'SIZE':>10} {'DELTA':>10}  UUID")
        for r in remote:
            print(
                f"{r.name:<32} {format_size(r.size_bytes):>10} "
                f"{format_size(r.delta_bytes):>10}  {r.uuid}"
            )
        return 0
    with _store(args).open(args.volume) as vol:
        snaps = vol.list_snapshots()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": s.name,
                        "uuid": str(s.uuid),
                        "size_bytes": s.size_bytes,
                        "created_ns": s.created_ns,
                        "delta_blocks": s.delta_blocks,
                    }
                    for s in snaps
                ],
                indent=2,
            )
        )
        return 0
    print(f"{'SNAPSHOT':<32} {'SIZE':>10} {'DELTA':>10}  UUID")
    for s in snaps:
        print(
            f"{s.name:<32} {format_size(s.size_bytes):>10} "
            f"{format_size(s.delta_blocks * 4096):>10}  {s.uuid}"
        )
    return 0
