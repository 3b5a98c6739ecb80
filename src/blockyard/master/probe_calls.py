"""The I/O half of a quorum failover's probe (:mod:`blockyard.master.probe`): fence each
replica, then ask its volume server for the last LSN its copy received — at once for all of
them, each within :data:`PROBE_TIMEOUT_S`.

Fencing moves the replica to the next epoch (SetReplication, durable on its server), so it
refuses the old primary's stream from then on. Without it the answer could be out of date
before the master used it: an old primary still alive (only unheard by the master) could go on
committing with the replicas not yet told of the failover, and a write it acknowledged on them
would be missing from the copy the master chose."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Final, Protocol

import grpc

from blockyard import errors
from blockyard.engine.epoch import Role
from blockyard.master.intents import ProbeLsns
from blockyard.replication.report import ReplicationInfo

log = logging.getLogger("blockyard.master")

#: Bound on one replica's answer. A replica that cannot answer this fast is treated as silent
#: (the probe is asked again a second later); the failover is already past the lease TTL.
PROBE_TIMEOUT_S: Final = 1.0


class ReplicationClient(Protocol):
    async def get_replication(self, name: str) -> ReplicationInfo: ...
    async def set_replication(self, name: str, *, role: Role, epoch: int) -> ReplicationInfo: ...
    async def close(self) -> None: ...


async def received_lsns(
    intent: ProbeLsns,
    api_of: Mapping[str, str],
    client_for: Callable[[str], ReplicationClient],
) -> dict[str, int]:
    """server id → the last LSN its copy received, for the servers of ``intent`` that were
    fenced (moved to the intent's epoch + 1 as replicas) and answered in time (the others are
    left out)."""
    fence = intent.epoch + 1

    async def ask(sid: str) -> int | None:
        api = api_of.get(sid, "")
        if not api:
            return None
        client = client_for(api)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await client.set_replication(intent.volume, role=Role.REPLICA, epoch=fence)
                info = await client.get_replication(intent.volume)
        except (errors.BlockyardError, grpc.RpcError, OSError, TimeoutError) as exc:
            log.warning("volume %s: replica %s did not say what it received: %s",
                        intent.volume, sid, exc or "timed out")  # fmt: skip
            return None
        finally:
            await client.close()
        if info.role is not Role.REPLICA or info.epoch != fence:
            log.warning(
                "volume %s: server %s holds it as %s at epoch %d, not a replica fenced at epoch "
                "%d; its answer does not count",
                intent.volume, sid, info.role.name.lower(), info.epoch, fence,
            )  # fmt: skip
            return None
        return info.last_lsn

    got = await asyncio.gather(*(ask(s) for s in intent.server_ids))
    return {sid: lsn for sid, lsn in zip(intent.server_ids, got, strict=True) if lsn is not None}
