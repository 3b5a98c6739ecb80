"""The master's in-memory index of servers and volumes (pure).

Records come from the store (with their store versions); live facts come from heartbeats and
are never persisted: when a server was last heard, on which stream, and the state of every
volume it holds as its last full heartbeat and later deltas describe it.

Indexes (replication address → server, zone → servers, server → volumes with a copy there)
are updated on every put and remove so that a replaced server (a new id on the same address)
or a forgotten one never lingers in them: sw-block's registry leaked replaced servers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from blockyard.master.model import ServerRecord, VolumeRecord, VolumeReport


@dataclass(slots=True)
class ServerLive:
    """What heartbeats told the master about one server since it (re)connected."""

    stream: int
    last_heartbeat_ns: int
    connected: bool = True
    stopping: bool = False
    free_bytes: int = 0
    allocated_bytes: int = 0
    capacity_bytes: int = 0
    reports: dict[str, VolumeReport] = field(default_factory=dict)


class Registry:
    def __init__(self) -> None:
        self.servers: dict[str, ServerRecord] = {}
        self.server_versions: dict[str, int] = {}
        self.volumes: dict[str, VolumeRecord] = {}
        self.volume_versions: dict[str, int] = {}
        self.live: dict[str, ServerLive] = {}
        self._by_replication: dict[str, str] = {}
        self._by_zone: dict[str, set[str]] = {}
        self._copies_on: dict[str, set[str]] = {}

    # ---- servers -------------------------------------------------------------------------

    def put_server(self, rec: ServerRecord, version: int) -> None:
        old = self.servers.get(rec.server_id)
        if old is not None:
            self._unindex_server(old)
        self.servers[rec.server_id] = rec
        self.server_versions[rec.server_id] = version
        if rec.addresses.replication:
            # The newest claimant of an address owns it: a server replaced on the same host
            # and port is a new server, and the old id must no longer resolve.
            self._by_replication[rec.addresses.replication] = rec.server_id
        self._by_zone.setdefault(rec.zone, set()).add(rec.server_id)

    def remove_server(self, server_id: str) -> None:
        rec = self.servers.pop(server_id, None)
        self.server_versions.pop(server_id, None)
        self.live.pop(server_id, None)
        if rec is not None:
            self._unindex_server(rec)

    def _unindex_server(self, rec: ServerRecord) -> None:
        addr = rec.addresses.replication
        if addr and self._by_replication.get(addr) == rec.server_id:
            del self._by_replication[addr]
        zone = self._by_zone.get(rec.zone)
        if zone is not None:
            zone.discard(rec.server_id)
            if not zone:
                del self._by_zone[rec.zone]

    def server_for_replication(self, address: str) -> str | None:
        return self._by_replication.get(address)

    def servers_in_zone(self, zone: str) -> frozenset[str]:
        return frozenset(self._by_zone.get(zone, ()))

    @property
    def zones(self) -> frozenset[str]:
        return frozenset(self._by_zone)

    def index_sizes(self) -> tuple[int, int, int]:
        """Entries in each index (for tests that check nothing leaks)."""
        return (
            len(self._by_replication),
            sum(len(s) for s in self._by_zone.values()),
            sum(len(s) for s in self._copies_on.values()),
        )

    # ---- volumes -------------------------------------------------------------------------

    def put_volume(self, rec: VolumeRecord, version: int) -> VolumeRecord | None:
        """Store ``rec``; returns the record it replaced."""
        old = self.volumes.get(rec.name)
        if old is not None:
            self._unindex_volume(old)
        self.volumes[rec.name] = rec
        self.volume_versions[rec.name] = version
        for server_id in rec.server_ids:
            self._copies_on.setdefault(server_id, set()).add(rec.name)
        return old

    def remove_volume(self, name: str) -> VolumeRecord | None:
        rec = self.volumes.pop(name, None)
        self.volume_versions.pop(name, None)
        if rec is not None:
            self._unindex_volume(rec)
        return rec

    def _unindex_volume(self, rec: VolumeRecord) -> None:
        for server_id in rec.server_ids:
            names = self._copies_on.get(server_id)
            if names is not None:
                names.discard(rec.name)
                if not names:
                    del self._copies_on[server_id]

    def volumes_on(self, server_id: str) -> frozenset[str]:
        return frozenset(self._copies_on.get(server_id, ()))

    def provisioned_bytes(self, server_id: str) -> int:
        """Bytes of volume the master placed on ``server_id`` (every copy at full size)."""
        return sum(self.volumes[n].size_bytes for n in self._copies_on.get(server_id, ()))

    def iter_volumes(self) -> Iterator[VolumeRecord]:
        return iter(sorted(self.volumes.values(), key=lambda r: r.name))
