"""Replication: the primary ships every write of a volume to its replicas.

This package's protocol core is sans-IO (bytes in, events out; no sockets, no asyncio):

- :mod:`~blockyard.replication.messages`: the messages and events, frozen dataclasses;
- :mod:`~blockyard.replication.wire`: framing, CRC32C, encode/decode;
- :mod:`~blockyard.replication.rules`: the payload bounds and rules, one check for both
  directions;
- :mod:`~blockyard.replication.connection`: one connection's handshake and epoch fencing;
- :mod:`~blockyard.replication.errors`: ``ErrorCode`` and the protocol error types.

docs/replication.md describes the wire format.
"""

from blockyard.replication.connection import (
    ConnectionState,
    ReplicationConnection,
    Side,
    peek_hello,
)
from blockyard.replication.errors import (
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    ReplicationProtocolError,
)
from blockyard.replication.messages import (
    NO_RECORD,
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
    ConnectionClosed,
    Error,
    Event,
    Extent,
    Hello,
    HistorySegment,
    Keepalive,
    Message,
    MessageType,
    NeedBlocks,
    NeedData,
    Plan,
    PlanKind,
    Progress,
    RecordId,
    RecordKind,
    Records,
    ReplicaDataState,
    ReplicaHello,
    ReplRecord,
    ResyncDone,
)
from blockyard.replication.wire import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_PAYLOAD_BYTES,
    OPEN_LSN,
    WIRE_VERSION,
    Frame,
    FrameReader,
    decode_message,
    encode_message,
    error_for,
    make_error,
)

__all__ = [
    "FRAME_HEADER_BYTES",
    "MAX_FRAME_PAYLOAD_BYTES",
    "NO_RECORD",
    "OPEN_LSN",
    "WIRE_VERSION",
    "Ack",
    "Barrier",
    "BlockRun",
    "BlockRunFlags",
    "Blocks",
    "ConnectionClosed",
    "ConnectionState",
    "Error",
    "ErrorCode",
    "Event",
    "Extent",
    "Frame",
    "FrameReader",
    "Hello",
    "HistorySegment",
    "Keepalive",
    "LocalProtocolError",
    "Message",
    "MessageType",
    "NeedBlocks",
    "NeedData",
    "Plan",
    "PlanKind",
    "Progress",
    "RecordId",
    "RecordKind",
    "Records",
    "RemoteProtocolError",
    "ReplRecord",
    "ReplicaDataState",
    "ReplicaHello",
    "ReplicationConnection",
    "ReplicationProtocolError",
    "ResyncDone",
    "Side",
    "decode_message",
    "encode_message",
    "error_for",
    "make_error",
    "peek_hello",
]
