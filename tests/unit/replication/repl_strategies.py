"""Hypothesis strategies for every replication message, within the wire spec's bounds, and
helpers to build raw frames by hand."""

from __future__ import annotations

import struct
import uuid

import crc32c
from hypothesis import strategies as st

from blockyard.replication.errors import ErrorCode
from blockyard.replication.messages import (
    Ack,
    Barrier,
    BlockRun,
    BlockRunFlags,
    Blocks,
    Error,
    Extent,
    Hello,
    HistorySegment,
    Keepalive,
    Message,
    MessageType,
    NeedBlocks,
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
    FRAME_MAGIC,
    MAX_ERROR_REASON_BYTES,
    MAX_HISTORY_SEGMENTS,
    MAX_PRIMARY_ID_BYTES,
    MAX_VOLUME_NAME_BYTES,
    OPEN_LSN,
    WIRE_BLOCK_BYTES,
    WIRE_VERSION,
    encode_message,
)

U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
#: Mostly small, sometimes the extremes, so boundaries are hit often.
LSN = st.integers(0, 1000) | st.sampled_from([2**32, 2**63, 2**64 - 2])
BLOCK = st.integers(0, 2**20) | st.sampled_from([2**64 - 2**33, 2**63])


def utf8_text(max_bytes: int) -> st.SearchStrategy[str]:
    """Strings whose UTF-8 encoding fits ``max_bytes``, including at the boundary."""
    small = st.text(max_size=max_bytes // 4)
    exact = st.just("x" * max_bytes) | st.just("é" * (max_bytes // 2))
    return (small | exact).filter(lambda s: len(s.encode("utf-8")) <= max_bytes)


record_ids = st.builds(RecordId, lsn=LSN, epoch=U64, generation=U32)


@st.composite
def histories(
    draw: st.DrawFn, max_segments: int = MAX_HISTORY_SEGMENTS
) -> tuple[HistorySegment, ...]:
    count = draw(st.integers(0, max_segments))
    segments = []
    epoch = draw(st.integers(0, 100))
    generation = draw(st.integers(0, 100))
    lsn = draw(st.integers(1, 1000))
    for index in range(count):
        length = draw(st.integers(0, 1000))
        is_open = index == count - 1 and draw(st.booleans())
        last = OPEN_LSN if is_open else lsn + length - 1
        segments.append(HistorySegment(epoch, generation, lsn, last))
        lsn += length + draw(st.integers(0, 3))  # renumbering after a crash may skip LSNs
        if draw(st.booleans()):
            epoch += draw(st.integers(1, 5))
            generation = draw(st.integers(0, 3))
        else:
            generation += draw(st.integers(1, 3))
    return tuple(segments)


hellos = st.builds(
    Hello,
    protocol_version=st.integers(1, 2**16 - 1),
    volume_uuid=st.uuids(),
    volume_name=utf8_text(MAX_VOLUME_NAME_BYTES),
    size_bytes=U64,
    primary_id=utf8_text(MAX_PRIMARY_ID_BYTES),
    head=record_ids,
    durable_lsn=U64,
    history=histories(),
)


@st.composite
def replica_hellos(draw: st.DrawFn) -> ReplicaHello:
    state = draw(st.sampled_from(ReplicaDataState))
    resyncing = state is ReplicaDataState.RESYNCING
    return ReplicaHello(
        volume_uuid=draw(st.uuids()),
        state=state,
        size_bytes=draw(U64),
        last=draw(record_ids),
        durable_lsn=draw(U64),
        history=draw(histories()),
        resync_id=draw(st.integers(1, 2**64 - 1)) if resyncing else 0,
        resync_cursor=draw(U64) if resyncing else 0,
    )


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    kind = draw(st.sampled_from(PlanKind))
    return Plan(
        kind=kind,
        start_lsn=draw(U64),
        resync_id=0 if kind is PlanKind.CATCH_UP else draw(st.integers(1, 2**64 - 1)),
        total_blocks=draw(U64),
        resume_cursor=draw(U64),
        diverged_after_lsn=draw(U64),
    )


@st.composite
def repl_records(draw: st.DrawFn, max_count: int = 8) -> tuple[ReplRecord, ...]:
    count = draw(st.integers(1, max_count))
    first = draw(st.integers(0, 2**64 - 1 - count))
    records = []
    for i in range(count):
        kind = draw(st.sampled_from(RecordKind))
        if kind is RecordKind.WRITE:
            block_count = draw(st.integers(1, 3))
            data: bytes = draw(st.binary(min_size=1, max_size=8))
            data = (data * (block_count * WIRE_BLOCK_BYTES // len(data) + 1))[
                : block_count * WIRE_BLOCK_BYTES
            ]
        else:
            block_count = draw(st.integers(1, 2**32 - 1))
            data = b""
        block = draw(st.integers(0, 2**64 - block_count))
        records.append(
            ReplRecord(
                lsn=first + i,
                epoch=draw(U64),
                generation=draw(U32),
                kind=kind,
                block=block,
                block_count=block_count,
                data=data,
            )
        )
    return tuple(records)


@st.composite
def block_runs(draw: st.DrawFn, max_count: int = 8) -> tuple[BlockRun, ...]:
    runs = []
    for _ in range(draw(st.integers(1, max_count))):
        if draw(st.booleans()):
            block_count = draw(st.integers(1, 2**32 - 1))
            runs.append(
                BlockRun(
                    block=draw(st.integers(0, 2**64 - block_count)),
                    block_count=block_count,
                    flags=BlockRunFlags.HOLE,
                )
            )
        else:
            block_count = draw(st.integers(1, 2))
            fill = draw(st.integers(0, 255))
            runs.append(
                BlockRun(
                    block=draw(st.integers(0, 2**64 - block_count)),
                    block_count=block_count,
                    data=bytes([fill]) * (block_count * WIRE_BLOCK_BYTES),
                )
            )
    return tuple(runs)


@st.composite
def extents(draw: st.DrawFn) -> Extent:
    block_count = draw(st.integers(1, 2**32 - 1))
    return Extent(block=draw(st.integers(0, 2**64 - block_count)), block_count=block_count)


NONZERO_U64 = st.integers(1, 2**64 - 1)

MESSAGES: dict[MessageType, st.SearchStrategy[Message]] = {
    MessageType.HELLO: hellos,
    MessageType.REPLICA_HELLO: replica_hellos(),
    MessageType.PLAN: plans(),
    MessageType.RECORDS: st.builds(Records, records=repl_records()),
    MessageType.BLOCKS: st.builds(
        Blocks, resync_id=NONZERO_U64, cursor=U64, read_lsn=U64, runs=block_runs()
    ),
    MessageType.RESYNC_DONE: st.builds(ResyncDone, resync_id=NONZERO_U64, final_lsn=U64),
    MessageType.BARRIER: st.builds(Barrier, barrier_id=NONZERO_U64, lsn=U64),
    MessageType.ACK: st.builds(Ack, barrier_id=U64, durable_lsn=U64, applied_lsn=U64),
    MessageType.PROGRESS: st.builds(Progress, resync_id=NONZERO_U64, cursor=U64),
    MessageType.NEED_BLOCKS: st.builds(
        NeedBlocks,
        final=st.booleans(),
        extents=st.lists(extents(), max_size=6).map(tuple),
    ),
    MessageType.KEEPALIVE: st.builds(Keepalive, durable_lsn=U64, commit_lsn=U64),
    MessageType.ERROR: st.builds(
        Error, code=st.sampled_from(ErrorCode), reason=utf8_text(MAX_ERROR_REASON_BYTES)
    ),
}
assert set(MESSAGES) == set(MessageType)

any_message = st.one_of(*MESSAGES.values())


def raw(message: Message, epoch: int = 1) -> bytes:
    """The frame of ``message`` as one bytes object."""
    return b"".join(bytes(part) for part in encode_message(message, epoch))


def frame_bytes(
    type_code: int,
    payload: bytes,
    *,
    epoch: int = 1,
    magic: int = FRAME_MAGIC,
    version: int = WIRE_VERSION,
    length: int | None = None,
    crc: int | None = None,
) -> bytes:
    """A hand-made frame: the given fields, a correct CRC unless ``crc`` is given."""
    prefix = struct.pack(
        ">HBBQI", magic, version, type_code, epoch, len(payload) if length is None else length
    )
    if crc is None:
        crc = crc32c.crc32c(payload, crc32c.crc32c(prefix))
    return prefix + struct.pack(">I", crc) + payload


def with_valid_crc(frame: bytes | bytearray) -> bytes:
    """``frame`` with its CRC recomputed over whatever its header and payload now hold."""
    prefix, payload = bytes(frame[:16]), bytes(frame[20:])
    crc = crc32c.crc32c(payload, crc32c.crc32c(prefix))
    return prefix + struct.pack(">I", crc) + payload


VOLUME = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


_HISTORY = (HistorySegment(1, 0, 1, 10), HistorySegment(2, 0, 11, OPEN_LSN))
#: A fixed, hand-written corpus: one or two valid messages of every type, for seeded fuzzing.
CORPUS: tuple[Message, ...] = (
    Hello(1, VOLUME, "vol-1", 1 << 30, "10.0.0.1:7000", RecordId(20, 2, 0), 18, _HISTORY),
    Hello(1, VOLUME, "", 0, "", RecordId(0, 0, 0), 0, ()),
    ReplicaHello(VOLUME, ReplicaDataState.CONSISTENT, 1 << 30, RecordId(5, 1, 0), 5, _HISTORY[:1],
                 0, 0),
    ReplicaHello(VOLUME, ReplicaDataState.RESYNCING, 1 << 30, RecordId(0, 0, 0), 0, (), 3, 77),
    Plan(PlanKind.CATCH_UP, 6, 0, 0, 0, OPEN_LSN),
    Plan(PlanKind.DELTA, 6, 3, 100, 77, 5),
    Records((
        ReplRecord(7, 2, 0, RecordKind.WRITE, 100, 2, bytes(range(256)) * 32),
        ReplRecord(8, 2, 0, RecordKind.ZERO, 0, 1000),
        ReplRecord(9, 2, 0, RecordKind.WRITE, 5, 1, b"\xee" * 4096),
    )),
    Records((ReplRecord(2**40, 9, 1, RecordKind.ZERO, 2**50, 2**32 - 1),)),
    Blocks(3, 10, 9, (
        BlockRun(0, 1, data=b"\x01" * 4096),
        BlockRun(1, 50, BlockRunFlags.HOLE),
        BlockRun(51, 2, data=bytes(range(256)) * 32),
    )),
    ResyncDone(3, 99),
    Barrier(1, 9),
    Ack(1, 9, 9),
    Ack(0, 0, 0),
    Progress(3, 51),
    NeedBlocks(True, (Extent(4, 2), Extent(100, 1))),
    NeedBlocks(False, ()),
    Keepalive(9, 9),
    Error(ErrorCode.STALE_EPOCH, "epoch 3 is below 4"),
)  # fmt: skip
assert {m.message_type for m in CORPUS} == set(MessageType)
