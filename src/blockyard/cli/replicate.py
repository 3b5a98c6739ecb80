"""``blockyard volume replicate | replication | checksum``: drive replication by hand.

``replicate NAME --server PRIMARY_API --replica REPLICA_API ...`` makes the volume on the primary
server a replicated one: on each replica server it creates the copy (same name, size and UUID),
gives it the replica role at the epoch, then gives the primary its replica set (the replica
servers' replication addresses, from their Health) and durability mode. Idempotent: run it again
to change the mode or the replica set (``--replica`` lists the whole new set). The master will
do the same through the same API.

``replication NAME --server API`` shows the state (in sync, catching up, resyncing with progress
and ETA, out of sync; lag), and ``--wait-in-sync`` waits until every replica is in sync.

``checksum NAME --server API`` prints the SHA-256 of the volume's content, to compare copies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any, Final

from blockyard import tls
from blockyard.cli.sizes import format_size, parse_size
from blockyard.engine.epoch import Role
from blockyard.errors import InvalidArgumentError
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.report import ReplicationInfo
from blockyard.server.client import VolumeServerClient

#: How often --wait-in-sync looks again.
_POLL_S: Final = 0.2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser(
        "replicate",
        help="replicate a volume to other volume servers (roles, epoch, durability mode)",
        description=__doc__.split("\n\n", 2)[1] if __doc__ else None,
    )
    sp.add_argument("name")
    sp.add_argument("--server", required=True, metavar="HOST:PORT", help="the primary's API")
    sp.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a replica server's management API (repeat: at most two); none: stop replicating",
    )
    sp.add_argument(
        "--durability",
        choices=[m.value for m in DurabilityMode],
        default=DurabilityMode.SYNC_ALL.value,
        help="when a flush is acknowledged (default sync_all)",
    )
    sp.add_argument(
        "--epoch",
        type=int,
        help="fencing epoch for every copy (default: the primary's, at least 1)",
    )
    sp.add_argument(
        "--resync-limit", metavar="RATE", help="resync bandwidth per replica, e.g. 200MiB (per s)"
    )
    sp.add_argument(
        "--wait-in-sync", type=float, metavar="SECONDS", help="wait until every replica is in sync"
    )
    sp.add_argument("--json", action="store_true")
    tls.add_arguments(sp, role="dial")
    sp.set_defaults(func=_replicate)

    sp = sub.add_parser("replication", help="show a volume's replication state")
    sp.add_argument("name")
    sp.add_argument("--server", required=True, metavar="HOST:PORT")
    sp.add_argument(
        "--wait-in-sync", type=float, metavar="SECONDS", help="wait until every replica is in sync"
    )
    sp.add_argument("--json", action="store_true")
    tls.add_arguments(sp, role="dial")
    sp.set_defaults(func=_replication)

    sp = sub.add_parser("checksum", help="SHA-256 of a volume's content (to compare copies)")
    sp.add_argument("name")
    sp.add_argument("--server", required=True, metavar="HOST:PORT")
    tls.add_arguments(sp, role="dial")
    sp.set_defaults(func=_checksum)


def _replicate(args: argparse.Namespace) -> int:
    security = tls.from_args(args)
    if len(args.replica) > 2:
        raise InvalidArgumentError("at most two --replica servers (RF 3)")
    limit = 0 if args.resync_limit is None else parse_size(args.resync_limit)
    mode = DurabilityMode(args.durability)

    async def main() -> ReplicationInfo:
        async with VolumeServerClient(args.server, security=security) as primary:
            vol = await primary.get_volume(args.name)
            epoch = args.epoch if args.epoch is not None else max(vol.epoch, 1)
            addresses = []
            for api in args.replica:
                async with VolumeServerClient(api, security=security) as rc:
                    health = await rc.health()
                    if not health.replication_address:
                        raise InvalidArgumentError(
                            f"volume server {api} has no replication listener; start it with "
                            "--replication-listen HOST:PORT"
                        )
                    await rc.create_volume(args.name, vol.size_bytes, volume_uuid=vol.uuid)
                    await rc.set_replication(args.name, role=Role.REPLICA, epoch=epoch)
                    addresses.append(health.replication_address)
            info = await primary.set_replication(
                args.name,
                role=Role.PRIMARY,
                epoch=epoch,
                mode=mode,
                replicas=addresses,
                resync_limit_bps=limit,
            )
            if args.wait_in_sync is not None:
                info = await _wait_in_sync(primary, args.name, args.wait_in_sync)
            return info

    _show(asyncio.run(main()), args.json)
    return 0


def _replication(args: argparse.Namespace) -> int:
    security = tls.from_args(args)

    async def main() -> ReplicationInfo:
        async with VolumeServerClient(args.server, security=security) as client:
            if args.wait_in_sync is not None:
                return await _wait_in_sync(client, args.name, args.wait_in_sync)
            return await client.get_replication(args.name)

    _show(asyncio.run(main()), args.json)
    return 0


async def _wait_in_sync(client: VolumeServerClient, name: str, timeout_s: float) -> ReplicationInfo:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await client.get_replication(name)
        if info.replicas and all(r.state == "in_sync" for r in info.replicas):
            return info
        if time.monotonic() >= deadline:
            _show(info, False)
            raise InvalidArgumentError(
                f"volume {name}: not every replica is in sync after {timeout_s:g} s; see the "
                "state above (last_error says why a replica is not connected)"
            )
        await asyncio.sleep(_POLL_S)


def _checksum(args: argparse.Namespace) -> int:
    security = tls.from_args(args)

    async def main() -> tuple[str, int, int]:
        async with VolumeServerClient(args.server, security=security) as client:
            c = await client.checksum_volume(args.name)
            return c.sha256, c.size_bytes, c.last_lsn

    sha, size, lsn = asyncio.run(main())
    print(f"{sha}  {args.name} ({format_size(size)}, LSN {lsn})")
    return 0


def _as_dict(info: ReplicationInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "role": info.role.name.lower(),
        "epoch": info.epoch,
        "mode": None if info.mode is None else info.mode.value,
        "last_lsn": info.last_lsn,
        "durable_lsn": info.durable_lsn,
        "data_state": None if info.data_state is None else info.data_state.name.lower(),
        "primary_connected": info.primary_connected,
        "replicas": [
            {
                "address": r.address,
                "state": r.state,
                "connected": r.connected,
                "phase": r.phase,
                "plan": r.plan,
                "plan_reason": r.plan_reason,
                "acked_lsn": r.acked_lsn,
                "lag_lsns": r.lag_lsns,
                "resync_total_bytes": r.resync_total_blocks * 4096,
                "resync_done_bytes": r.resync_done_blocks * 4096,
                "resync_eta_s": round(r.resync_eta_s, 1),
                "last_error": r.last_error,
            }
            for r in info.replicas
        ],
    }


def _show(info: ReplicationInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_as_dict(info), indent=2))
        return
    line = (
        f"volume {info.name}: {info.role.name.lower()} at epoch {info.epoch}, LSN {info.last_lsn}"
    )
    if info.mode is not None:
        line += f", {info.mode.value}"
    if info.data_state is not None:
        line += f", data {info.data_state.name.lower()}"
        line += ", primary connected" if info.primary_connected else ", no primary connected"
    print(line)
    for r in info.replicas:
        detail = f"plan {r.plan}" if r.plan else ""
        if r.phase == "resyncing" and r.resync_total_blocks:
            done = 100.0 * r.resync_done_blocks / r.resync_total_blocks
            detail += f", resync {done:.0f}% of {format_size(r.resync_total_blocks * 4096)}"
            if r.resync_eta_s:
                detail += f", ETA {r.resync_eta_s:.0f} s"
        if r.last_error and not r.connected:
            detail += f", last error: {r.last_error}"
        print(
            f"  replica {r.address}: {r.state} ({r.phase}), lag {r.lag_lsns} LSNs"
            + (f", {detail}" if detail else ""),
            file=sys.stdout,
        )
