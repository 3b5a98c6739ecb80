"""``blockyard volume ... --master HOST:PORT[,...]``: replicated volumes through the master, and
``blockyard servers`` / ``blockyard status``: the cluster as the master sees it.

Output is a table by default; ``-o json`` prints what scripts should parse (the field names
are a contract: ``primary``, ``replicas`` with ``state``, ``epoch``), ``-o wide`` adds columns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from blockyard import tls
from blockyard.cli.sizes import format_size, parse_size
from blockyard.errors import InvalidArgumentError
from blockyard.master.client import DEFAULT_TIMEOUT_S, MasterClient
from blockyard.master.proto import master_pb2 as mpb
from blockyard.server.proto import volume_server_pb2 as vpb

T = TypeVar("T")

#: --durability values → the API's enum (the replication issue's three modes).
DURABILITY_BY_NAME: Final[dict[str, int]] = {
    "best_effort": vpb.DURABILITY_MODE_BEST_EFFORT,
    "sync_all": vpb.DURABILITY_MODE_SYNC_ALL,
    "sync_quorum": vpb.DURABILITY_MODE_SYNC_QUORUM,
}
_NAME_BY_DURABILITY: Final = {v: k for k, v in DURABILITY_BY_NAME.items()}
_ROLE_NAMES: Final[dict[int, str]] = {
    vpb.ROLE_NONE: "none",
    vpb.ROLE_PRIMARY: "primary",
    vpb.ROLE_REPLICA: "replica",
    vpb.ROLE_REBUILDING: "rebuilding",
}
OUTPUTS: Final = ("table", "wide", "json")


def add_output(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "-o", "--output", choices=OUTPUTS, default=None, help="table (default), wide or json"
    )


def output_of(args: argparse.Namespace) -> str:
    out: str | None = getattr(args, "output", None)
    if out is None:
        return "json" if getattr(args, "json", False) else "table"
    return out


def call(args: argparse.Namespace, fn: Callable[[MasterClient], Awaitable[T]]) -> T:
    security = tls.from_args(args)
    timeout_s: float = getattr(args, "timeout", None) or DEFAULT_TIMEOUT_S

    async def main() -> T:
        async with MasterClient(args.master, security=security, timeout_s=timeout_s) as client:
            return await fn(client)

    return asyncio.run(main())


# ---- shapes ------------------------------------------------------------------------------------


def role_name(role: int) -> str:
    return _ROLE_NAMES.get(role, "unknown")


def mode_name(mode: int) -> str:
    return _NAME_BY_DURABILITY.get(mode, "unspecified")


def copy_dict(c: mpb.CopyInfo) -> dict[str, Any]:
    return {
        "server_id": c.server_id,
        "role": role_name(c.role),
        "state": c.state,
        "durable_lsn": c.durable_lsn,
        "zone": c.zone,
        "api": c.addresses.api,
        "iscsi_portals": list(c.addresses.iscsi_portals),
        "replication": c.addresses.replication,
        "resync_total_bytes": c.resync_total_bytes,
        "resync_done_bytes": c.resync_done_bytes,
    }


def volume_dict(v: mpb.VolumeInfo) -> dict[str, Any]:
    copies = [copy_dict(c) for c in v.copies]
    primary = next((c for c in copies if c["server_id"] == v.primary_server_id), None)
    return {
        "name": v.name,
        "uuid": v.uuid,
        "size_bytes": v.size_bytes,
        "replica_count": v.replica_count,
        "durability": mode_name(v.mode),
        "epoch": v.epoch,
        "status": v.status,
        "iqn": v.iqn,
        "primary": primary,
        "replicas": [c for c in copies if c["server_id"] != v.primary_server_id],
        "parameters": dict(v.parameters),
    }


def server_dict(s: mpb.ServerInfo) -> dict[str, Any]:
    return {
        "server_id": s.server_id,
        "state": s.state,
        "zone": s.zone,
        "api": s.addresses.api,
        "iscsi_portals": list(s.addresses.iscsi_portals),
        "replication": s.addresses.replication,
        "capacity_bytes": s.capacity_bytes,
        "free_bytes": s.free_bytes,
        "allocated_bytes": s.allocated_bytes,
        "primaries": s.primary_count,
        "replicas": s.replica_count,
        "last_heartbeat_ms_ago": s.last_heartbeat_ms_ago,
        "drain_remaining": s.drain_remaining,
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart (kubectl's look)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _progress(c: dict[str, Any]) -> str:
    total = c["resync_total_bytes"]
    if c["state"] != "rebuilding" or not total:
        return ""
    return f" {100 * min(c['resync_done_bytes'], total) // total}%"


def print_volumes(volumes: Sequence[mpb.VolumeInfo], output: str) -> None:
    dicts = [volume_dict(v) for v in volumes]
    if output == "json":
        print(json.dumps(dicts if len(dicts) != 1 else dicts[0], indent=2))
        return
    headers = ["NAME", "SIZE", "COPIES", "DURABILITY", "STATUS", "EPOCH", "PRIMARY", "REPLICAS"]
    if output == "wide":
        headers += ["UUID", "IQN"]
    rows = []
    for d in dicts:
        replicas = ",".join(f"{c['server_id']}({c['state']}{_progress(c)})" for c in d["replicas"])
        primary = d["primary"]["server_id"] if d["primary"] else "-"
        row = [d["name"], format_size(d["size_bytes"]), d["replica_count"], d["durability"],
               d["status"], d["epoch"], primary, replicas or "-"]  # fmt: skip
        if output == "wide":
            row += [d["uuid"], d["iqn"]]
        rows.append(row)
    print(table(headers, rows))


def print_servers(servers: Sequence[mpb.ServerInfo], output: str) -> None:
    dicts = [server_dict(s) for s in servers]
    if output == "json":
        print(json.dumps(dicts, indent=2))
        return
    headers = ["ID", "STATE", "ZONE", "API", "FREE", "PRIMARIES", "REPLICAS", "LAST SEEN"]
    if output == "wide":
        headers += ["ISCSI", "REPLICATION", "CAPACITY", "ALLOCATED"]
    rows = []
    for d in dicts:
        row = [d["server_id"], d["state"], d["zone"] or "-", d["api"],
               format_size(d["free_bytes"]), d["primaries"], d["replicas"],
               f"{d['last_heartbeat_ms_ago'] / 1000:.1f}s ago"]  # fmt: skip
        if output == "wide":
            row += [
                ",".join(d["iscsi_portals"]),
                d["replication"],
                format_size(d["capacity_bytes"]),
                format_size(d["allocated_bytes"]),
            ]
        rows.append(row)
    print(table(headers, rows))


# ---- volume actions ------------------------------------------------------------------------


def create(args: argparse.Namespace) -> int:
    if getattr(args, "wal_size", None):
        raise InvalidArgumentError("--wal-size needs --data-dir; the servers pick the WAL size")
    mode = 0
    if args.durability:
        mode = DURABILITY_BY_NAME[args.durability]
    size = parse_size(args.size)
    replicas = args.replicas or 0
    info = call(
        args,
        lambda c: c.create_volume(args.name, size, replica_count=replicas, mode=mode),
    )
    out = output_of(args)
    if out == "table":
        d = volume_dict(info)
        where = d["primary"]["server_id"] if d["primary"] else "no primary yet"
        print(
            f"created volume {info.name} ({format_size(info.size_bytes)}, {info.replica_count} "
            f"copies, {d['durability']}, status {info.status}), primary {where}, iSCSI {info.iqn}"
        )
    else:
        print_volumes([info], out)
    return 0


def delete(args: argparse.Namespace) -> int:
    existed = call(args, lambda c: c.delete_volume(args.name))
    print(f"deleted volume {args.name}" if existed else f"no volume {args.name}: nothing to delete")
    return 0


def list_(args: argparse.Namespace) -> int:
    print_volumes(call(args, lambda c: c.list_all_volumes()), output_of(args))
    return 0


def get(args: argparse.Namespace) -> int:
    print_volumes([call(args, lambda c: c.get_volume(args.name))], output_of(args))
    return 0


def expand(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    info = call(args, lambda c: c.expand_volume(args.name, size))
    print(f"volume {info.name} is now {format_size(info.size_bytes)} on every copy")
    return 0


# ---- servers / status ----------------------------------------------------------------------


def _add_master(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--master", required=True, metavar="HOST:PORT[,HOST:PORT]",
                    help="the master (every address of an HA group)")  # fmt: skip
    sp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help="give up when no master answered within this time")  # fmt: skip
    tls.add_arguments(sp, role="dial")


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = verbs.add_parser("servers", help="the volume servers the master knows, and their state")
    _add_master(sp)
    add_output(sp)
    sp.set_defaults(func=_servers)

    sp = verbs.add_parser(
        "status", help="servers, volumes, roles, epochs, replication and rebuild progress"
    )
    _add_master(sp)
    add_output(sp)
    sp.set_defaults(func=_status)


def _servers(args: argparse.Namespace) -> int:
    print_servers(call(args, lambda c: c.list_servers()), output_of(args))
    return 0


def _status(args: argparse.Namespace) -> int:
    async def fetch(
        c: MasterClient,
    ) -> tuple[mpb.LeaderInfo, list[mpb.ServerInfo], list[mpb.VolumeInfo]]:
        return await c.get_leader(), await c.list_servers(), await c.list_all_volumes()

    leader, servers, volumes = call(args, fetch)
    out = output_of(args)
    if out == "json":
        print(
            json.dumps(
                {
                    "leader": {
                        "id": leader.leader_id,
                        "address": leader.leader_address,
                        "store": leader.store,
                        "promotions_allowed": leader.promotions_allowed,
                        "lease_ttl_ms": leader.lease_ttl_ms,
                    },
                    "servers": [server_dict(s) for s in servers],
                    "volumes": [volume_dict(v) for v in volumes],
                },
                indent=2,
            )
        )
        return 0
    held = "" if leader.promotions_allowed else " (promotions held back: new leader)"
    print(
        f"master {leader.leader_id or '?'} at {leader.leader_address or '?'} leads "
        f"(store {leader.store or '?'}, lease {leader.lease_ttl_ms} ms){held}"
    )
    print()
    print_servers(servers, out)
    print()
    if volumes:
        print_volumes(volumes, out)
    else:
        print("no volumes")
    sys.stdout.flush()
    return 0
