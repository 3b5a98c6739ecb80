"""The volume server's side of the degrade decision: a primary run by a master has the master
record a replica out of sync (``blockyard.v1.Master/MarkOutOfSync``) before it acknowledges a
flush without that replica (see :mod:`blockyard.replication.primary`).

The master answers only once the mark is in its store, and never promotes a copy its store
holds out of sync, so no acknowledged write can live only on copies the master may still
promote. Each mark is one call bounded by :data:`MARK_TIMEOUT_S` (redirects to the leader and
retries across master addresses included); a failure raises, and the primary's durability mode
decides what its flushes do meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from blockyard import tls
from blockyard.errors import ServerUnavailableError
from blockyard.master.client import MasterClient

#: Bound of one MarkOutOfSync call. A flush that must degrade waits the barrier timeout (5 s)
#: plus this before it fails, well inside an initiator's 30 s SCSI command timeout and the
#: primary's own 25 s commit wait; long enough for a store write on a loaded master.
MARK_TIMEOUT_S: Final = 5.0


class MasterMarker:
    """An :class:`~blockyard.replication.primary.OutOfSyncMarker` over the master group.
    Used on the server's event loop only (its client is made there on first use)."""

    def __init__(
        self,
        masters: Sequence[str],
        server_id: str,
        *,
        timeout_s: float = MARK_TIMEOUT_S,
        security: tls.TransportSecurity = tls.PLAINTEXT,
    ) -> None:
        self.masters = list(masters)
        self.security = security
        self.server_id = server_id
        self.timeout_s = timeout_s
        self._client: MasterClient | None = None
        self._closed = False
        #: Marks the master recorded (for tests and status).
        self.marked = 0

    async def mark_out_of_sync(
        self, volume: str, epoch: int, replica: str, decided_ns: int
    ) -> None:
        if self._closed:
            raise ServerUnavailableError(
                f"this server is stopping: replica {replica} of volume {volume!r} is not marked "
                "out of sync at the master"
            )
        client = self._client
        if client is None:
            # Dialed as the heartbeat stream to the same masters is.
            client = self._client = MasterClient(
                self.masters, timeout_s=self.timeout_s, security=self.security
            )
        await client.mark_out_of_sync(volume, epoch, self.server_id, replica, decided_ns)
        self.marked += 1

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close the channels; later marks fail (the server is stopping)."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()
