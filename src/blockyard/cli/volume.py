"""``blockyard volume``: manage volumes in a local data directory or on a volume server.

With ``--data-dir`` these commands open volume files directly; while ``blockyard serve`` runs on
the same directory the volume file lock refuses them with a message pointing at the management
API. With ``--server HOST:PORT`` they go through that server's management API instead (restore
needs ``--data-dir``: the API has no restore). A server off loopback is dialed with mutual TLS
(``--tls-cert``, ``--tls-key``, ``--tls-ca``) or, explicitly, ``--insecure``.

``volume auth`` and ``volume access`` set who may log in to a volume's iSCSI target (CHAP,
mutual CHAP, the initiator ACL; see docs/ARCHITECTURE.md, "Authentication"). Secrets are read
from files (``-`` for stdin), never taken on the command line, and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from blockyard import tls
from blockyard.cli import replicate, volume_master
from blockyard.cli.sizes import format_size, parse_size
from blockyard.engine import VolumeInfo, VolumeStore
from blockyard.errors import InvalidArgumentError, TlsConfigError
from blockyard.iscsi.chap import MAX_SECRET_LENGTH, ChapCredentials
from blockyard.server.auth import (
    VolumeAuth,
    check_initiator_name,
    credentials,
    load_auth,
    save_auth,
)
from blockyard.server.backend import (
    AccessInfo,
    SnapshotDescription,
    SnapshotRef,
    VolumeDescription,
)
from blockyard.server.client import VolumeServerClient

T = TypeVar("T")
#: A secret file holds one secret (and maybe a newline); more is a wrong path, not a secret.
SECRET_FILE_BYTES_MAX: Final = MAX_SECRET_LENGTH + 2


def _add_location(
    sp: argparse.ArgumentParser, *, server: bool = True, master: bool = False
) -> None:
    where = sp.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", help="directory holding the volumes")
    if master:
        where.add_argument(
            "--master",
            metavar="HOST:PORT[,HOST:PORT]",
            help="the master (replicated volumes on every copy; all addresses of an HA group)",
        )
    if server:
        where.add_argument(
            "--server", metavar="HOST:PORT", help="a volume server's management API address"
        )
        tls.add_arguments(sp, role="dial")


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("volume", help="create, list, delete, grow, snapshot and clone volumes")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help_: str, func: Any, *, master: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        _add_location(sp, master=master)
        sp.set_defaults(func=func)
        return sp

    sp = add("create", "create a volume (all zeros, thin-provisioned)", _create, master=True)
    sp.add_argument("name")
    sp.add_argument("--size", required=True, help="e.g. 1GiB, 512MiB")
    sp.add_argument("--wal-size", help="WAL size (default: size/16 within 1-64 MiB)")
    sp.add_argument(
        "--replicas", type=int, default=0,
        help="copies, 1-3 (--master only; default: 2 with two servers, else 1)",
    )  # fmt: skip
    sp.add_argument(
        "--durability", choices=sorted(volume_master.DURABILITY_BY_NAME),
        help="when a flush is acknowledged (--master only; default sync_all)",
    )  # fmt: skip
    sp.add_argument("--json", action="store_true")
    volume_master.add_output(sp)

    sp = add("delete", "delete a volume and every file it owns (idempotent)", _delete, master=True)
    sp.add_argument("name")

    sp = add("list", "list volumes", _list, master=True)
    sp.add_argument("--json", action="store_true")
    volume_master.add_output(sp)

    for verb in ("info", "get"):
        sp = add(verb, "show one volume", _info, master=True)
        sp.add_argument("name")
        sp.add_argument("--json", action="store_true")
        volume_master.add_output(sp)

    for verb in ("grow", "expand"):
        sp = add(verb, "grow a volume (shrinking is refused)", _grow, master=True)
        sp.add_argument("name")
        sp.add_argument("--size", required=True)

    sp = add("clone", "create a new volume from a snapshot", _clone)
    sp.add_argument("source")
    sp.add_argument("snapshot")
    sp.add_argument("name")

    sp = add("auth", "require CHAP (or mutual CHAP) to log in to a volume, or stop", _auth)
    sp.add_argument("name")
    sp.add_argument("--chap-user", help="the CHAP user initiators log in as")
    sp.add_argument(
        "--chap-secret-file",
        metavar="FILE",
        help="file holding the initiators' CHAP secret (12-255 bytes; - reads stdin)",
    )
    sp.add_argument("--mutual-user", help="the target's own CHAP user, for mutual CHAP")
    sp.add_argument(
        "--mutual-secret-file", metavar="FILE", help="file holding the target's CHAP secret"
    )
    sp.add_argument("--off", action="store_true", help="stop requiring CHAP")

    sp = add("access", "show or change which initiators may log in to a volume", _access)
    sp.add_argument("name")
    sp.add_argument("--allow", action="append", default=[], metavar="IQN",
                    help="admit this initiator (repeat for several)")  # fmt: skip
    sp.add_argument("--revoke", action="append", default=[], metavar="IQN",
                    help="stop admitting this initiator and end its sessions")  # fmt: skip
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--only", action="store_true",
                     help="admit exactly the --allow initiators (none: nobody)")  # fmt: skip
    how.add_argument("--open", action="store_true", help="admit every initiator name")

    replicate.register(sub)

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
        "chap_user": d.access.chap_user,
        "mutual_chap_user": d.access.mutual_chap_user,
        "restricted": d.access.restricted,
        "allowed_initiators": list(d.access.allowed_initiators),
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
    if args.master:
        return volume_master.create(args)
    if args.replicas or args.durability:
        raise InvalidArgumentError(
            "--replicas and --durability go with --master: the master places the copies"
        )
    args.json = args.json or args.output == "json"
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
    if args.master:
        return volume_master.delete(args)
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
    if args.master:
        return volume_master.list_(args)
    args.json = args.json or args.output == "json"
    if args.server:
        _print_remote(_remote(args, lambda c: c.list_all_volumes()), args.json)
        return 0
    _print_infos(_store(args).list(), args.json)
    return 0


def _info(args: argparse.Namespace) -> int:
    if args.master:
        return volume_master.get(args)
    args.json = args.json or args.output == "json"
    if args.server:
        _print_remote([_remote(args, lambda c: c.get_volume(args.name))], args.json)
        return 0
    _print_infos([_store(args).info(args.name)], args.json)
    return 0


def _grow(args: argparse.Namespace) -> int:
    if args.master:
        return volume_master.expand(args)
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


# ---- access control -------------------------------------------------------------------------


def _read_secret(path: str, flag: str) -> bytes:
    """A secret from a file (``-``: stdin), without one trailing newline."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(SECRET_FILE_BYTES_MAX + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(SECRET_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise InvalidArgumentError(f"{flag} {path}: cannot read it ({exc.strerror})") from exc
    if len(data) > SECRET_FILE_BYTES_MAX:
        raise InvalidArgumentError(
            f"{flag} {path} holds more than {MAX_SECRET_LENGTH} bytes: a CHAP secret file "
            "holds the secret alone"
        )
    return data.removesuffix(b"\n").removesuffix(b"\r")


def _chap_args(
    args: argparse.Namespace,
) -> tuple[ChapCredentials | None, ChapCredentials | None]:
    given = [args.chap_user, args.chap_secret_file, args.mutual_user, args.mutual_secret_file]
    if args.off:
        if any(given):
            raise InvalidArgumentError("--off takes no credentials")
        return None, None
    if not args.chap_user or not args.chap_secret_file:
        raise InvalidArgumentError(
            "give --chap-user and --chap-secret-file (and --mutual-user with "
            "--mutual-secret-file for mutual CHAP), or --off"
        )
    if bool(args.mutual_user) != bool(args.mutual_secret_file):
        raise InvalidArgumentError("mutual CHAP needs both --mutual-user and --mutual-secret-file")
    chap = credentials(
        "--chap-user/--chap-secret-file",
        args.chap_user,
        _read_secret(args.chap_secret_file, "--chap-secret-file"),
    )
    mutual = None
    if args.mutual_user:
        mutual = credentials(
            "--mutual-user/--mutual-secret-file",
            args.mutual_user,
            _read_secret(args.mutual_secret_file, "--mutual-secret-file"),
        )
    return chap, mutual


def _describe_access(name: str, info: AccessInfo) -> str:
    chap = f"CHAP user {info.chap_user}" if info.chap_user else "no CHAP"
    if info.mutual_chap_user:
        chap += f", mutual CHAP user {info.mutual_chap_user}"
    if not info.restricted:
        who = "every initiator"
    else:
        who = ", ".join(info.allowed_initiators) or "no initiator"
    return f"volume {name}: {chap}; admits {who}"


def _local_update(
    args: argparse.Namespace, change: Callable[[VolumeAuth], VolumeAuth]
) -> AccessInfo:
    """Change the rules of a volume that no server has open (its lock proves it)."""
    with _store(args).open(args.name) as vol:
        current = load_auth(vol.directory, vol.name)
        updated = change(current)
        if updated != current:
            save_auth(vol.directory, updated)
        return updated.info()


def _auth(args: argparse.Namespace) -> int:
    chap, mutual = _chap_args(args)
    if args.server:
        info = _remote(args, lambda c: c.set_volume_auth(args.name, chap, mutual)).access
    else:
        info = _local_update(args, lambda a: a.with_chap(chap, mutual))
    print(_describe_access(args.name, info))
    return 0


def _access(args: argparse.Namespace) -> int:
    allow = [check_initiator_name("--allow", n) for n in args.allow]
    revoke = [check_initiator_name("--revoke", n) for n in args.revoke]
    if args.open and (allow or revoke):
        raise InvalidArgumentError("--open admits everyone: it takes no --allow or --revoke")
    if args.only and revoke:
        raise InvalidArgumentError("--only replaces the list: give it --allow names only")
    if args.server:

        async def remote(c: VolumeServerClient) -> VolumeDescription:
            # One idempotent call per change: the server applies each to its current rules,
            # so a CSI publish running at the same time is never overwritten.
            if args.open:
                return await c.set_volume_access(args.name, None)
            if args.only:
                return await c.set_volume_access(args.name, allow)
            desc = await c.get_volume(args.name)
            for name in allow:
                desc = await c.allow_initiator(args.name, name)
            for name in revoke:
                desc = await c.revoke_initiator(args.name, name)
            return desc

        info = _remote(args, remote).access
    else:

        def change(rules: VolumeAuth) -> VolumeAuth:
            if args.open:
                return rules.with_access(None)
            if args.only:
                return rules.with_access(allow)
            for name in allow:
                rules = rules.allowing(name)
            for name in revoke:
                rules = rules.revoking(name)
            return rules

        info = _local_update(args, change)
    print(_describe_access(args.name, info))
    return 0
