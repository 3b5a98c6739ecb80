"""A replication connection over asyncio streams: the thin adapter around the sans-IO
:class:`~blockyard.replication.connection.ReplicationConnection`.

Every wait is bounded: reads by the dead-peer timeout (the peer sends a keepalive at least every
:data:`KEEPALIVE_INTERVAL_S`), writes by :data:`SEND_TIMEOUT_S` (a peer that stops reading
stalls our ``drain``, never our memory: the transport's buffer is bounded by its high-water
mark).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from blockyard.replication.connection import ReplicationConnection
from blockyard.replication.errors import RemoteProtocolError
from blockyard.replication.messages import ConnectionClosed, Error, Message, NeedData
from blockyard.replication.wire import error_for

log = logging.getLogger("blockyard.replication")

#: Both sides send something at least this often.
KEEPALIVE_INTERVAL_S: Final = 1.0
#: Silence for this long means the peer is gone (a partition sends no RST).
DEAD_PEER_TIMEOUT_S: Final = 5.0
#: Longest a write may wait for the peer to read.
SEND_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 5.0
#: Bytes read from the socket per call.
READ_CHUNK_BYTES: Final = 1 << 18
#: The transport pauses our writer above this many buffered bytes.
WRITE_HIGH_WATER_BYTES: Final = 8 << 20


class PeerGoneError(Exception):
    """The peer closed, went silent past the dead-peer timeout, or stopped reading."""


class Channel:
    """One replication connection on asyncio streams. One task reads; writes may come from
    several tasks of the same loop (each ``send`` writes one whole frame)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: ReplicationConnection,
        *,
        peer: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.peer = peer
        self._write_lock = asyncio.Lock()
        transport = writer.transport
        with contextlib.suppress(AttributeError, NotImplementedError):
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)

    async def recv(self, timeout_s: float = DEAD_PEER_TIMEOUT_S) -> Message:
        """The next message. Raises :class:`PeerGoneError` on EOF or silence, and
        :class:`RemoteProtocolError` (after answering it with ``Error``) for a bad frame."""
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                await self._answer(exc)
                raise
            if isinstance(event, ConnectionClosed):
                raise PeerGoneError(f"{self.peer} closed the connection")
            if not isinstance(event, NeedData):
                if isinstance(event, Error):
                    raise PeerGoneError(
                        f"{self.peer} ended the connection: {event.code.name}: {event.reason}"
                    )
                return event
            try:
                async with asyncio.timeout(timeout_s):
                    data = await self.reader.read(READ_CHUNK_BYTES)
            except TimeoutError:
                raise PeerGoneError(
                    f"{self.peer} sent nothing for {timeout_s:g} s (dead or partitioned)"
                ) from None
            except OSError as exc:
                raise PeerGoneError(f"{self.peer}: {exc}") from exc
            self.conn.receive_data(data)

    async def send(self, *messages: Message) -> None:
        async with self._write_lock:
            for message in messages:
                self.writer.writelines(self.conn.send(message))
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self.writer.drain()
            except TimeoutError:
                raise PeerGoneError(f"{self.peer} did not read for {SEND_TIMEOUT_S:g} s") from None
            except OSError as exc:
                raise PeerGoneError(f"{self.peer}: {exc}") from exc

    async def _answer(self, exc: RemoteProtocolError) -> None:
        log.warning("replication peer %s broke the protocol: %s", self.peer, exc)
        with contextlib.suppress(Exception):
            self.writer.writelines(self.conn.send(error_for(exc)))
            async with asyncio.timeout(1.0):
                await self.writer.drain()

    async def send_error(self, error: Error) -> None:
        """Best effort: tell the peer why we end the connection."""
        with contextlib.suppress(Exception):
            async with self._write_lock:
                self.writer.writelines(self.conn.send(error))
                async with asyncio.timeout(1.0):
                    await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
