"""Regression: a deep CmdSN window of big READs was answered all at once.

Fifteen initiators that queued 8 MiB READs and never read the answers grew the server by
368 MiB: one ``next_events`` call executed every READ the window held and produced all their
Data-In before the transport's high-water mark could stop anything. The same happened when a
gap in CmdSN filled and every queued command ran in one go.

Now the connection takes a command only while the output it has produced (and promised, for
reads handed out as events) is below ``output_room_bytes``; it reports ``output_blocked`` and
takes the rest on a later ``next_events``, in order and byte for byte as before.
"""

from __future__ import annotations

import uuid

from target_support import BLOCKS, Initiator, pattern, read10, tur

from blockyard.iscsi.pdu import BHS_LENGTH, DataIn, Pdu, ScsiCommand, encode_pdu
from blockyard.iscsi.reader import NEED_DATA
from blockyard.scsi import LogicalUnit, LuIdentity, MemoryReservationStore, StaticAlua
from blockyard.testing.memdev import MemoryBlockDevice

BLOCK = 512
READ_BLOCKS = 2048  # 1 MiB per READ
READ_BYTES = READ_BLOCKS * BLOCK
ROOM_BYTES = 3 * READ_BYTES
READS = 32


def ready(*, fast: bool) -> Initiator:
    device = MemoryBlockDevice(BLOCKS)
    device.write(0, pattern(2 * READ_BYTES, seed=5))
    lu = LogicalUnit(
        device, LuIdentity(uuid.uuid4()), StaticAlua.single(), MemoryReservationStore()
    )
    ini = Initiator(lu=lu)
    ini.login()
    ini.send(ScsiCommand(itt=1, cdb=tur(), cmd_sn=ini.next_cmd_sn()))  # eat POWER ON UA
    ini.conn.fast_path = fast
    return ini


def reads(ini: Initiator, count: int) -> list[ScsiCommand]:
    return [
        ScsiCommand(
            itt=0x1000 + i,
            cdb=read10((i % 2) * READ_BLOCKS, READ_BLOCKS),
            expected_data_transfer_length=READ_BYTES,
            cmd_sn=ini.next_cmd_sn(),
            read=True,
        )
        for i in range(count)
    ]


def one_round(ini: Initiator) -> tuple[int, list[Pdu]]:
    """One adapter turn with ROOM_BYTES of room: bytes produced and the PDUs they carry."""
    ini.conn.output_room_bytes = ROOM_BYTES
    ini._run(ini.conn.next_events())
    buffers = ini.conn.data_to_send()
    produced = sum(len(b) for b in buffers)
    for buf in buffers:
        ini.reader.receive_data(bytes(buf))
    pdus: list[Pdu] = []
    while True:
        pdu = ini.reader.next_pdu()
        if pdu is NEED_DATA:
            return produced, pdus
        pdus.append(pdu)


def finished(pdus: list[Pdu]) -> list[int]:
    return [p.itt for p in pdus if isinstance(p, DataIn) and p.status_present]


def drain(ini: Initiator, expected: list[int]) -> None:
    """Run rounds until every READ is answered; each round stays within its room plus one
    READ, and the answers come in CmdSN order with the right data."""
    answered: list[int] = []
    data: dict[int, bytearray] = {}
    rounds = 0
    while len(answered) < len(expected):
        rounds += 1
        assert rounds <= len(expected), "the connection stopped making progress"
        produced, pdus = one_round(ini)
        assert produced <= ROOM_BYTES + READ_BYTES + 64 * BHS_LENGTH
        for pdu in pdus:
            if isinstance(pdu, DataIn):
                data.setdefault(pdu.itt, bytearray()).extend(pdu.data)
        answered += finished(pdus)
        assert ini.conn.output_blocked == (len(answered) < len(expected))
    assert answered == expected
    whole = pattern(2 * READ_BYTES, seed=5)
    for itt in expected:
        half = (itt - 0x1000) % 2
        assert bytes(data[itt]) == whole[half * READ_BYTES : (half + 1) * READ_BYTES]


def test_fast_path_reads_stop_at_the_room() -> None:
    ini = ready(fast=True)
    commands = reads(ini, READS)
    ini.conn.receive_data(b"".join(encode_pdu(c) for c in commands))
    produced, pdus = one_round(ini)
    # Three 1 MiB answers fill the 3 MiB room; the fourth waits.
    assert finished(pdus) == [0x1000, 0x1001, 0x1002]
    assert ini.conn.output_blocked
    assert produced <= ROOM_BYTES + READ_BYTES
    drain(ini, [c.itt for c in commands[3:]])


def test_general_path_reads_count_as_promised_before_they_run() -> None:
    ini = ready(fast=False)
    commands = reads(ini, READS)
    ini.conn.receive_data(b"".join(encode_pdu(c) for c in commands))
    drain(ini, [c.itt for c in commands])
    assert ini.conn.promised_output_bytes == 0


def test_commands_queued_behind_a_cmd_sn_gap_drain_within_the_room() -> None:
    ini = ready(fast=True)
    commands = reads(ini, READS)
    # Everything but the first arrives: queued, waiting for the gap (RFC 7143 §4.2.2.1).
    ini.conn.receive_data(b"".join(encode_pdu(c) for c in commands[1:]))
    produced, pdus = one_round(ini)
    assert produced == 0 and pdus == []
    ini.conn.receive_data(encode_pdu(commands[0]))
    drain(ini, [c.itt for c in commands])


def test_an_unbounded_connection_still_answers_everything_at_once() -> None:
    """Without a room set (sans-IO users, the tests above aside) nothing changes."""
    ini = ready(fast=True)
    commands = reads(ini, 8)
    out = ini.send_bytes(b"".join(encode_pdu(c) for c in commands))
    assert finished(out) == [c.itt for c in commands]
    assert not ini.conn.output_blocked
