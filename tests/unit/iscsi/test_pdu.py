"""PDU codec and PduReader: round trips, framing, digests, bounds."""

from __future__ import annotations

import dataclasses
import struct

import crc32c
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from blockyard.iscsi import pdu as p
from blockyard.iscsi.errors import (
    DataDigestError,
    HeaderDigestError,
    LocalProtocolError,
    PduFormatError,
    PduTooLargeError,
    RejectReason,
    UnsupportedOpcodeError,
)
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
SMALL_DATA = st.binary(max_size=70)

_COMMON = {
    "lun": st.integers(0, (1 << 64) - 1),
    "isid": st.integers(0, (1 << 48) - 1),
    "tsih": U16,
    "cid": U16,
    "time2wait": U16,
    "time2retain": U16,
    "parameter1": U16,
    "parameter2": U16,
    "parameter3": U16,
    "version_max": U8,
    "version_min": U8,
    "version_active": U8,
    "async_event": U8,
    "async_vcode": U8,
    "response": U8,
    "status": U8,
    "reason": U8,
    "csg": st.sampled_from([0, 1, 3]),
    "nsg": st.sampled_from([0, 1, 3]),
    "task_attr": st.integers(0, 7),
    "function": st.integers(0, 0x7F),
    "snack_type": st.integers(0, 0x0F),
    "cdb": st.binary(min_size=16, max_size=p.MAX_CDB_LENGTH),
    "bidi_read_expected_length": st.none() | U32,
    "data": SMALL_DATA,
}
_OVERRIDES = {
    (p.LoginResponse, "status"): U16,
    (p.LogoutRequest, "reason"): st.integers(0, 0x7F),
}
_NO_DATA = {
    p.TaskManagementRequest,
    p.TaskManagementResponse,
    p.LogoutRequest,
    p.LogoutResponse,
    p.R2T,
    p.SnackRequest,
}
INITIATOR_PDUS = [
    p.NopOut,
    p.ScsiCommand,
    p.TaskManagementRequest,
    p.LoginRequest,
    p.TextRequest,
    p.DataOut,
    p.LogoutRequest,
    p.SnackRequest,
]
TARGET_PDUS = [
    p.NopIn,
    p.ScsiResponse,
    p.TaskManagementResponse,
    p.LoginResponse,
    p.TextResponse,
    p.DataIn,
    p.LogoutResponse,
    p.R2T,
    p.AsyncMessage,
    p.Reject,
]


def pdu_strategy(cls: type) -> st.SearchStrategy[p.Pdu]:
    kwargs: dict[str, st.SearchStrategy[object]] = {}
    for f in dataclasses.fields(cls):
        if (cls, f.name) in _OVERRIDES:
            kwargs[f.name] = _OVERRIDES[(cls, f.name)]
        elif f.name == "data" and cls in _NO_DATA:
            kwargs[f.name] = st.just(b"")
        elif f.name in _COMMON:
            kwargs[f.name] = _COMMON[f.name]
        elif f.type in ("bool", bool):
            kwargs[f.name] = st.booleans()
        else:
            kwargs[f.name] = U32
    return st.builds(cls, **kwargs)


def peer_of(pdu: p.Pdu) -> PeerRole:
    return PeerRole.INITIATOR if pdu.opcode < 0x20 else PeerRole.TARGET


def encodable(pdu: p.Pdu, **digests: bool) -> bytes:
    try:
        return p.encode_pdu(pdu, **digests)
    except LocalProtocolError:
        assume(False)
        raise


def read_all(reader: PduReader) -> list[p.Pdu]:
    out: list[p.Pdu] = []
    while (pdu := reader.next_pdu()) is not NEED_DATA:
        out.append(pdu)
    return out


@pytest.mark.parametrize("cls", INITIATOR_PDUS + TARGET_PDUS, ids=lambda c: c.__name__)
@given(data=st.data(), header_digest=st.booleans(), data_digest=st.booleans())
def test_round_trip_every_pdu_type(
    cls: type, data: st.DataObject, header_digest: bool, data_digest: bool
) -> None:
    pdu = data.draw(pdu_strategy(cls))
    wire = encodable(pdu, header_digest=header_digest, data_digest=data_digest)
    assert len(wire) % 4 == 0
    reader = PduReader(peer=peer_of(pdu), header_digest=header_digest, data_digest=data_digest)
    reader.receive_data(wire)
    assert read_all(reader) == [pdu]
    assert reader.buffered_bytes == 0


def _sample_stream() -> tuple[list[p.Pdu], bytes]:
    pdus: list[p.Pdu] = [
        p.ScsiCommand(itt=1, cdb=bytes(range(16)), write=True, final=False, data=b"abc"),
        p.DataOut(itt=1, ttt=7, data_sn=0, buffer_offset=3, final=True, data=bytes(4096)),
        p.NopOut(itt=2, immediate=True),
        p.ScsiCommand(itt=3, cdb=bytes(range(32)), read=True, bidi_read_expected_length=512),
    ]
    wire = b"".join(p.encode_pdu(x, header_digest=True, data_digest=True) for x in pdus)
    return pdus, wire


def _reader() -> PduReader:
    return PduReader(
        peer=PeerRole.INITIATOR,
        header_digest=True,
        data_digest=True,
        max_data_segment_length=8192,
    )


def test_reader_fed_whole() -> None:
    pdus, wire = _sample_stream()
    reader = _reader()
    reader.receive_data(wire)
    assert read_all(reader) == pdus


def test_reader_fed_one_byte_at_a_time() -> None:
    pdus, wire = _sample_stream()
    reader = _reader()
    out: list[p.Pdu] = []
    for i in range(len(wire)):
        reader.receive_data(wire[i : i + 1])
        out += read_all(reader)
    assert out == pdus


def test_reader_keeps_trailing_bytes_buffered() -> None:
    pdus, wire = _sample_stream()
    first_len = len(p.encode_pdu(pdus[0], header_digest=True, data_digest=True))
    reader = _reader()
    reader.receive_data(wire[: first_len + 30])
    assert reader.next_pdu() == pdus[0]
    assert reader.next_pdu() is NEED_DATA
    assert reader.buffered_bytes == 30
    reader.receive_data(wire[first_len + 30 :])
    assert read_all(reader) == pdus[1:]


@given(st.lists(pdu_strategy(p.DataOut) | pdu_strategy(p.NopOut), max_size=5), st.data())
def test_reader_any_chunking(pdus: list[p.Pdu], data: st.DataObject) -> None:
    wire = b"".join(p.encode_pdu(x) for x in pdus)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    reader = PduReader(peer=PeerRole.INITIATOR)
    out: list[p.Pdu] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        reader.receive_data(wire[start:end])
        out += read_all(reader)
    assert out == pdus


def test_data_segment_is_a_readonly_view_that_survives_more_input() -> None:
    reader = PduReader(peer=PeerRole.INITIATOR)
    reader.receive_data(p.encode_pdu(p.DataOut(data=b"x" * 100)) + b"\x00" * 10)
    pdu = reader.next_pdu()
    assert isinstance(pdu, p.DataOut) and isinstance(pdu.data, memoryview)
    assert pdu.data.readonly
    reader.receive_data(b"\x01" * 100)
    assert bytes(pdu.data) == b"x" * 100


def test_rfc7143_crc32c_examples() -> None:
    # RFC 7143 Appendix B.4: digests go on the wire least significant byte first.
    assert struct.pack("<I", crc32c.crc32c(bytes(32))) == bytes.fromhex("aa36918a")
    assert struct.pack("<I", crc32c.crc32c(b"\xff" * 32)) == bytes.fromhex("43aba862")
    assert struct.pack("<I", crc32c.crc32c(bytes(range(32)))) == bytes.fromhex("4e79dd46")
    read10 = bytes.fromhex(
        "01a00000" + "00" * 12 + "04050000" + "00010000" + "00000005" + "00000004"
        "2a000000" + "00000000" + "80000000" + "00000000"
    )
    assert struct.pack("<I", crc32c.crc32c(read10)) == bytes.fromhex("937051db")


def test_scsi_command_header_layout() -> None:
    cmd = p.ScsiCommand(
        itt=0x01020304,
        cdb=b"\x28" + bytes(9),
        lun=0x0001000000000000,
        expected_data_transfer_length=4096,
        cmd_sn=9,
        exp_stat_sn=5,
        read=True,
        immediate=True,
    )
    wire = p.encode_pdu(cmd)
    assert len(wire) == 48
    assert wire[0] == 0x41 and wire[1] == 0x80 | 0x40 | 1
    assert wire[8:16] == bytes.fromhex("0001000000000000")
    assert wire[16:20] == bytes.fromhex("01020304")
    assert wire[20:24] == (4096).to_bytes(4, "big")
    assert wire[32] == 0x28


def test_encode_buffers_do_not_copy_the_data_segment() -> None:
    payload = memoryview(bytearray(b"y" * 4097))
    buffers = p.encode_pdu_buffers(p.DataIn(data=payload, final=True), data_digest=True)
    assert buffers[1] is payload
    assert buffers[2] == b"\x00\x00\x00"
    assert len(buffers[3]) == 4


def test_header_digest_error_is_fatal() -> None:
    wire = bytearray(p.encode_pdu(p.NopOut(itt=1), header_digest=True))
    wire[20] ^= 1
    reader = PduReader(peer=PeerRole.INITIATOR, header_digest=True)
    reader.receive_data(bytes(wire))
    with pytest.raises(HeaderDigestError) as info:
        reader.next_pdu()
    assert info.value.fatal
    with pytest.raises(HeaderDigestError):
        reader.next_pdu()


def test_data_digest_error_rejects_and_continues() -> None:
    bad = bytearray(p.encode_pdu(p.DataOut(itt=1, data=b"hello"), data_digest=True))
    bad[50] ^= 0xFF
    good = p.encode_pdu(p.NopOut(itt=2), data_digest=True)
    reader = PduReader(peer=PeerRole.INITIATOR, data_digest=True)
    reader.receive_data(bytes(bad) + good)
    with pytest.raises(DataDigestError) as info:
        reader.next_pdu()
    assert info.value.reject_reason == RejectReason.DATA_DIGEST_ERROR
    assert info.value.header == bytes(bad[:48])
    assert not info.value.fatal
    assert reader.next_pdu() == p.NopOut(itt=2)


def test_oversized_data_segment_refused_before_buffering() -> None:
    header = bytearray(48)
    header[0] = p.Opcode.SCSI_DATA_OUT
    header[5:8] = (8193).to_bytes(3, "big")
    reader = PduReader(peer=PeerRole.INITIATOR, max_data_segment_length=8192)
    reader.receive_data(bytes(header))
    with pytest.raises(PduTooLargeError) as info:
        reader.next_pdu()
    assert info.value.fatal and info.value.header == bytes(header)
    assert reader.buffered_bytes == 48


def test_unknown_opcode_is_consumed_and_answered_command_not_supported() -> None:
    header = bytearray(48)
    header[0] = 0x1C  # vendor-specific initiator opcode
    header[5:8] = (5).to_bytes(3, "big")
    reader = PduReader(peer=PeerRole.INITIATOR)
    reader.receive_data(bytes(header) + b"abcde\x00\x00\x00" + p.encode_pdu(p.NopOut()))
    with pytest.raises(UnsupportedOpcodeError) as info:
        reader.next_pdu()
    assert info.value.reject_reason == RejectReason.COMMAND_NOT_SUPPORTED
    assert reader.next_pdu() == p.NopOut()


def test_target_opcode_from_initiator_is_a_protocol_error() -> None:
    reader = PduReader(peer=PeerRole.INITIATOR)
    reader.receive_data(p.encode_pdu(p.NopIn()))
    with pytest.raises(UnsupportedOpcodeError) as info:
        reader.next_pdu()
    assert info.value.reject_reason == RejectReason.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.__setitem__(1, 0x80 | 0x40),  # Text Request with F and C
    ],
)
def test_invalid_field_rejected(mutate: object) -> None:
    wire = bytearray(p.encode_pdu(p.TextRequest()))
    mutate(wire)  # type: ignore[operator]
    reader = PduReader(peer=PeerRole.INITIATOR)
    reader.receive_data(bytes(wire))
    with pytest.raises(PduFormatError) as info:
        reader.next_pdu()
    assert info.value.reject_reason == RejectReason.INVALID_PDU_FIELD


def test_bad_ahs_rejected() -> None:
    wire = bytearray(p.encode_pdu(p.ScsiCommand(cdb=bytes(20))))
    wire[50] = 9  # reserved AHS type
    reader = PduReader(peer=PeerRole.INITIATOR)
    reader.receive_data(bytes(wire))
    with pytest.raises(PduFormatError):
        reader.next_pdu()


def test_local_errors_for_out_of_range_fields() -> None:
    with pytest.raises(LocalProtocolError):
        p.encode_pdu(p.NopOut(itt=1 << 32))
    with pytest.raises(LocalProtocolError):
        p.encode_pdu(p.DataIn(status_present=True, final=False))
    with pytest.raises(LocalProtocolError):
        p.encode_pdu(p.ScsiCommand(cdb=bytes(300)))


def test_sense_segment_round_trip() -> None:
    sense = bytes([0x70, 0, 5]) + bytes(15)
    assert p.parse_sense_segment(p.sense_segment(sense)) == sense
    with pytest.raises(PduFormatError):
        p.parse_sense_segment(b"\x00\x10abc")
