"""``blockyard volume``: manage volumes in a local data directory.

These commands open volume files directly; while ``blockyard serve`` runs on the same directory
the volume file lock refuses them with a message pointing at the management API.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from blockyard.cli.sizes import format_size, parse_size
from blockyard.engine import VolumeInfo, VolumeStore


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("volume", help="create, list, delete, grow, snapshot and clone volumes")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--data-dir", required=True, help="directory holding the volumes")
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
        sp.add_argument("--data-dir", required=True)
        sp.add_argument("volume")
        sp.add_argument("snapshot")
        sp.set_defaults(func=func)
    sp = ssub.add_parser("list", help="list a volume's snapshots")
    sp.add_argument("--data-dir", required=True)
    sp.add_argument("volume")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_snap_list)


def _store(args: argparse.Namespace) -> VolumeStore:
    return VolumeStore(args.data_dir)


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
    _store(args).delete(args.name)
    print(f"deleted volume {args.name}")
    return 0


def _list(args: argparse.Namespace) -> int:
    _print_infos(_store(args).list(), args.json)
    return 0


def _info(args: argparse.Namespace) -> int:
    _print_infos([_store(args).info(args.name)], args.json)
    return 0


def _grow(args: argparse.Namespace) -> int:
    with _store(args).open(args.name) as vol:
        vol.grow(parse_size(args.size))
        print(f"volume {vol.name} is now {format_size(vol.size_bytes)}")
    return 0


def _clone(args: argparse.Namespace) -> int:
    store = _store(args)
    with store.open(args.source) as src:
        clone = store.clone(src, args.snapshot, args.name)
        clone.close()
    print(f"cloned {args.source}@{args.snapshot} into volume {args.name}")
    return 0


def _snap_create(args: argparse.Namespace) -> int:
    with _store(args).open(args.volume) as vol:
        info = vol.create_snapshot(args.snapshot)
    print(f"created snapshot {args.volume}@{info.name}")
    return 0


def _snap_delete(args: argparse.Namespace) -> int:
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
