"""Fuzz: whatever bytes an initiator sends after login, the target connection answers with
PDUs (Rejects included) or closes; no other exception ever escapes, and the output always
decodes as valid target PDUs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from target_support import Initiator, read10, tur, write10

from blockyard.iscsi.pdu import (
    DataOut,
    NopOut,
    ScsiCommand,
    SnackRequest,
    TaskManagementRequest,
    TextRequest,
    encode_pdu,
)

_VALID = [
    encode_pdu(ScsiCommand(itt=1, cdb=tur(), cmd_sn=0)),
    encode_pdu(
        ScsiCommand(
            itt=2, cdb=read10(0, 4), expected_data_transfer_length=2048, cmd_sn=1, read=True
        )
    ),
    encode_pdu(
        ScsiCommand(
            itt=3,
            cdb=write10(0, 2),
            expected_data_transfer_length=1024,
            cmd_sn=2,
            write=True,
            data=bytes(512),
            final=False,
        )
    ),
    encode_pdu(DataOut(itt=3, buffer_offset=512, final=True, data=bytes(512))),
    encode_pdu(NopOut(itt=4, cmd_sn=3, immediate=True, data=b"ping")),
    encode_pdu(TaskManagementRequest(itt=5, function=1, referenced_task_tag=3, immediate=True)),
    encode_pdu(TextRequest(itt=6, cmd_sn=3, data=b"SendTargets=\x00")),
    encode_pdu(SnackRequest(itt=7)),
]


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


def _drive(ini: Initiator, chunks: list[bytes]) -> None:
    for chunk in chunks:
        if ini.conn.closed:
            break
        ini.send_bytes(chunk)  # decodes every output PDU: the target only emits valid PDUs
        ini.tick()
        ini.finish_held()


@given(
    st.lists(
        st.tuples(
            st.sampled_from(_VALID),
            st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=4),
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_mutated_pdus_never_raise(
    items: list[tuple[bytes, list[tuple[int, int]]]], hold: bool
) -> None:
    ini = Initiator()
    ini.login()
    ini.auto_execute = not hold
    _drive(ini, [_mutate(pdu, flips) for pdu, flips in items])


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=6))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    ini = Initiator()
    ini.login()
    _drive(ini, chunks)


@given(st.binary(max_size=600))
def test_random_bytes_during_login_never_raise(data: bytes) -> None:
    ini = Initiator()
    ini.send_bytes(data)
    ini.tick()
