"""Assignments, retained until confirmed (pure).

An assignment tells one server what it holds of a volume: role, epoch, and for a primary its
replica set and durability mode. The master re-sends a server's pending assignments on every
heartbeat reply until a heartbeat reports the matching state, so an assignment lost with a
reply, a broken stream or a server restart is never lost for good (sw-block lost them between
heartbeats). A newer epoch replaces an older assignment of the same volume; an assignment whose
epoch the server has already passed is pruned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from blockyard.engine.epoch import Role
from blockyard.errors import BlockyardError
from blockyard.master.model import VolumeReport
from blockyard.replication.commit import DurabilityMode

#: Pending assignments per server: one per volume, so the bound is the volumes a server may
#: hold; more means the registry is broken, and the put is refused.
MAX_ASSIGNMENTS_PER_SERVER: Final = 4096


class AssignmentQueueFullError(BlockyardError):
    """A server has more unconfirmed assignments than any server holds volumes."""


@dataclass(frozen=True, slots=True)
class Assignment:
    volume: str
    uuid: str
    size_bytes: int
    role: Role
    epoch: int
    mode: DurabilityMode
    #: Primary only: the replication addresses of its replicas.
    replicas: tuple[str, ...] = ()
    #: Create the copy when the server does not hold it (a new replica).
    create: bool = False
    #: Delete the copy.
    deleted: bool = False

    def confirmed_by(self, report: VolumeReport | None) -> bool:
        """Whether ``report`` (the server's current state of the volume; None: it holds none)
        shows this assignment applied."""
        if self.deleted:
            return report is None or report.deleted
        if report is None or report.deleted or report.uuid != self.uuid:
            return False
        if report.role is not self.role or report.epoch != self.epoch:
            return False
        if self.role is Role.PRIMARY:
            return {r.address for r in report.replicas} == set(self.replicas)
        return True

    def superseded_by(self, report: VolumeReport | None) -> bool:
        """The server is already at a newer epoch: this assignment can never apply."""
        return (
            not self.deleted
            and report is not None
            and report.uuid == self.uuid
            and report.epoch > self.epoch
        )


class AssignmentQueue:
    def __init__(self) -> None:
        self._pending: dict[str, dict[str, Assignment]] = {}

    def put(self, server_id: str, assignment: Assignment) -> None:
        """Queue ``assignment`` (replacing the volume's previous one on that server unless the
        previous one is for a newer epoch)."""
        queue = self._pending.setdefault(server_id, {})
        old = queue.get(assignment.volume)
        if old is not None and old.epoch > assignment.epoch and not assignment.deleted:
            return
        if old is None and len(queue) >= MAX_ASSIGNMENTS_PER_SERVER:
            raise AssignmentQueueFullError(
                f"server {server_id} has {len(queue)} unconfirmed assignments; it is not "
                "applying them (check its log) or holds more volumes than supported"
            )
        queue[assignment.volume] = assignment

    def pending(self, server_id: str) -> list[Assignment]:
        return sorted(self._pending.get(server_id, {}).values(), key=lambda a: a.volume)

    def get(self, server_id: str, volume: str) -> Assignment | None:
        return self._pending.get(server_id, {}).get(volume)

    def confirm(self, server_id: str, reports: Mapping[str, VolumeReport]) -> list[Assignment]:
        """Drop the assignments ``reports`` (the server's whole current state) confirm or
        supersede; returns the confirmed ones."""
        queue = self._pending.get(server_id)
        if not queue:
            return []
        done: list[Assignment] = []
        for name, a in list(queue.items()):
            report = reports.get(name)
            if a.confirmed_by(report):
                done.append(a)
                del queue[name]
            elif a.superseded_by(report):
                del queue[name]
        if not queue:
            del self._pending[server_id]
        return done

    def drop_volume(self, volume: str) -> None:
        for server_id in list(self._pending):
            self._pending[server_id].pop(volume, None)
            if not self._pending[server_id]:
                del self._pending[server_id]

    def drop(self, server_id: str, volume: str) -> None:
        queue = self._pending.get(server_id)
        if queue is not None:
            queue.pop(volume, None)
            if not queue:
                del self._pending[server_id]

    def drop_server(self, server_id: str) -> None:
        self._pending.pop(server_id, None)

    def __len__(self) -> int:
        return sum(len(q) for q in self._pending.values())
