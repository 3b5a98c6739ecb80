"""Failover and replacement decisions (pure).

When a primary stops being heard, the master *defers* a promotion until the primary's lease has
certainly expired (:mod:`blockyard.master.leases`). A deferred promotion is cancelled when the
primary is heard again, holding the volume as primary at the current epoch, before it was
carried out (sw-block's deferred timer fired even after the primary had reconnected).

The new primary is the in-sync copy (as the store records it) with the highest durable LSN on
a live server. A copy the store holds out of sync, rebuilding or pending is never promoted: it
may lack acknowledged writes. With no such copy, nothing is promoted and the volume waits for
its primary.

The promoted record has epoch + 1, the new primary, and the old primary as an out-of-sync
replica: it is fenced by the epoch when it returns and is caught up by the new primary.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

from blockyard import sabotage
from blockyard.engine.epoch import Role
from blockyard.master.model import CopyRecord, CopyState, VolumeRecord, VolumeStatus


@dataclass(frozen=True, slots=True)
class DeferredPromotion:
    volume: str
    epoch: int
    since_ns: int


class DeferredPromotions:
    """Promotions waiting for a lease to expire; one per volume (bounded by the registry)."""

    def __init__(self) -> None:
        self._pending: dict[str, DeferredPromotion] = {}

    def defer(self, volume: str, epoch: int, now_ns: int) -> DeferredPromotion:
        cur = self._pending.get(volume)
        if cur is None or cur.epoch != epoch:
            cur = DeferredPromotion(volume, epoch, now_ns)
            self._pending[volume] = cur
        return cur

    def cancel(self, volume: str) -> bool:
        return self._pending.pop(volume, None) is not None

    def get(self, volume: str) -> DeferredPromotion | None:
        return self._pending.get(volume)

    def __contains__(self, volume: object) -> bool:
        return volume in self._pending

    def __len__(self) -> int:
        return len(self._pending)


def choose_new_primary(
    rec: VolumeRecord, usable: Collection[str], durable_lsn: Callable[[CopyRecord], int]
) -> CopyRecord | None:
    """The in-sync, non-primary copy on a usable server with the highest durable LSN (the
    server id breaks ties, so the choice is deterministic)."""
    eligible = [
        c
        for c in rec.copies
        if c.server_id != rec.primary and c.state is CopyState.IN_SYNC and c.server_id in usable
    ]
    if not eligible:
        return None
    return min(eligible, key=lambda c: (-durable_lsn(c), c.server_id))


def promote(
    rec: VolumeRecord, new_primary: str, lsns: Mapping[str, int], *, above: int | None = None
) -> VolumeRecord:
    """``rec`` after failing over to ``new_primary``: the next epoch (above ``above`` too, the
    epoch a probe fenced the replicas at); the old primary becomes an out-of-sync replica; live
    durable LSNs recorded."""
    copies = []
    for c in rec.copies:
        lsn = lsns.get(c.server_id, c.durable_lsn)
        if c.server_id == new_primary:
            copies.append(replace(c, role=Role.PRIMARY, durable_lsn=lsn))
        elif c.server_id == rec.primary:
            copies.append(
                replace(c, role=Role.REPLICA, state=CopyState.OUT_OF_SYNC, durable_lsn=lsn)
            )
        else:
            copies.append(replace(c, durable_lsn=lsn))
    epoch = max(rec.epoch, above or 0) + 1
    if sabotage.active(sabotage.LOSE_EPOCH_BUMP):
        epoch = rec.epoch
    out = replace(rec, epoch=epoch, primary=new_primary, copies=tuple(copies))
    return replace(out, status=out.settled_status())


def replace_copy(rec: VolumeRecord, dead_server: str, new_server: str | None) -> VolumeRecord:
    """``rec`` with the (non-primary) copy on ``dead_server`` dropped, and a new pending
    replica on ``new_server`` when one was found. Degraded either way until it is in sync."""
    assert dead_server != rec.primary, "a primary's copy is failed over, not replaced"
    out = rec.without_copy(dead_server)
    if new_server is not None:
        out = out.with_copy(CopyRecord(new_server, Role.REPLICA, CopyState.PENDING))
    return replace(out, status=VolumeStatus.DEGRADED)
