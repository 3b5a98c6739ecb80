"""Error types of the replication wire protocol.

Two families, split by whose fault the error is (the h11 model, as in ``blockyard.iscsi.errors``):

- :class:`LocalProtocolError`: our side asked for something the protocol forbids (a message in
  the wrong state or direction, a field over its bound). A bug in the caller; nothing was sent.
- :class:`RemoteProtocolError`: the peer sent something the protocol forbids. ``code`` is what to
  answer it with: send ``Error(code, reason)`` (``Error.from_exception``) and close.

Both carry an :class:`ErrorCode`, the same code that travels in an ``Error`` message, so a
boundary translates by ``code`` and type, never by message text.
"""

from __future__ import annotations

from enum import IntEnum

from blockyard.errors import BlockyardError


class ErrorCode(IntEnum):
    """Codes of the ``Error`` message (u16 on the wire); replication wire spec v1."""

    #: A malformed frame or message.
    PROTOCOL = 1
    #: The frame's CRC32C does not match its bytes.
    BAD_CRC = 2
    #: A declared length or count is over its bound.
    TOO_LARGE = 3
    #: Frame version (or the Hello's protocol version) that this side does not speak.
    UNSUPPORTED_VERSION = 4
    #: The frame's epoch is below the receiver's (DESIGN invariant 2).
    STALE_EPOCH = 5
    #: The volume UUID does not match the volume this connection is for.
    WRONG_VOLUME = 6
    #: A message not allowed in this state or from this side (or an epoch change mid-connection).
    UNEXPECTED = 7
    #: A record's LSN is not consecutive with what the replica applied.
    GAP = 8
    #: The two copies disagree on the volume size.
    SIZE_MISMATCH = 9
    #: Our side failed; the reason says why.
    INTERNAL = 10
    #: The sender is shutting down.
    SHUTDOWN = 11


class ReplicationProtocolError(BlockyardError):
    """Base of every replication protocol error; ``code`` is the ``Error`` code that fits it."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class LocalProtocolError(ReplicationProtocolError):
    """Our side tried to send (or do) something the protocol forbids; nothing was sent.

    The message names the field or the state that was wrong; ``code`` is what the peer would
    have answered had it been sent.
    """


class RemoteProtocolError(ReplicationProtocolError):
    """The peer broke the protocol; answer with ``Error(code, reason)`` and close the connection.

    The connection that raised it is unusable afterwards (framing or state can no longer be
    trusted): only sending that one ``Error`` is still allowed.
    """
