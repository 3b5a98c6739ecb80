"""Fuzz: whatever bytes a peer sends, only RemoteProtocolError subclasses come out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from iscsi_helpers import IDENTITY_TEXT, make_target_login

from blockyard.iscsi.errors import RemoteProtocolError
from blockyard.iscsi.login import LoginState
from blockyard.iscsi.pdu import DataOut, LoginRequest, ScsiCommand, TextRequest, encode_pdu
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole

SEEDS = [
    encode_pdu(ScsiCommand(itt=1, cdb=bytes(range(40)), bidi_read_expected_length=8)),
    encode_pdu(DataOut(itt=1, data=b"payload"), header_digest=True, data_digest=True),
    encode_pdu(TextRequest(data=b"SendTargets=All\x00")),
    encode_pdu(LoginRequest(transit=True, nsg=1, data=IDENTITY_TEXT)),
]


def drain(reader: PduReader) -> None:
    for _ in range(64):
        try:
            if reader.next_pdu() is NEED_DATA:
                return
        except RemoteProtocolError as exc:
            if exc.fatal:
                return


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=150)
@given(
    payload=st.binary(max_size=400) | mutated(),
    peer=st.sampled_from(PeerRole),
    header_digest=st.booleans(),
    data_digest=st.booleans(),
    chunk=st.integers(1, 64),
)
def test_reader_only_raises_remote_protocol_errors(
    payload: bytes, peer: PeerRole, header_digest: bool, data_digest: bool, chunk: int
) -> None:
    reader = PduReader(
        peer=peer, header_digest=header_digest, data_digest=data_digest, max_data_segment_length=512
    )
    for i in range(0, len(payload), chunk):
        reader.receive_data(payload[i : i + chunk])
        drain(reader)


@settings(max_examples=100)
@given(st.lists(mutated() | st.binary(min_size=48, max_size=200), min_size=1, max_size=4))
def test_login_state_machine_answers_garbage_with_statuses(payloads: list[bytes]) -> None:
    target = make_target_login()
    reader = PduReader(peer=PeerRole.INITIATOR)
    for payload in payloads:
        reader.receive_data(payload)
        try:
            pdu = reader.next_pdu()
        except RemoteProtocolError:
            return
        if pdu is NEED_DATA:
            return
        response = target.receive(pdu)
        assert (response.status == 0) == (target.state is not LoginState.FAILED)
        if target.state is not LoginState.IN_PROGRESS:
            return
