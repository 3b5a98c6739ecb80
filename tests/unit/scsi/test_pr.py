"""PERSISTENT RESERVE IN/OUT, the conflict table, and the reservation stores."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from scsi_support import I1, I2, Harness, data_of, pr_in, pr_out, read10, sense_of, write10

from blockyard.errors import CorruptionError
from blockyard.scsi import FileReservationStore, LogicalUnit, LuIdentity, Status
from blockyard.scsi.alua import StaticAlua
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.pr import decode_transport_id, encode_transport_id
from blockyard.scsi.reservations import PrState, PrType, Registration, Reservation, state_to_json
from blockyard.testing.memdev import MemoryBlockDevice

K1, K2 = 0x1111, 0x2222
REGISTER, RESERVE, RELEASE, CLEAR, PREEMPT, _, REG_IGNORE, MOVE = range(8)


def _do(h: Harness, nexus: Nexus, sa: int, rk: int, sark: int, t: int = 0, f: int = 0) -> Status:
    cdb, params = pr_out(sa, rk, sark, t, f)
    return h.run(cdb, params, nexus=nexus).status


def _keys(h: Harness, nexus: Nexus = I1) -> list[int]:
    data = data_of(h.run(pr_in(0), nexus=nexus))
    n = struct.unpack(">I", data[4:8])[0] // 8
    return [struct.unpack(">Q", data[8 + 8 * i : 16 + 8 * i])[0] for i in range(n)]


def _registered(h: Harness) -> Harness:
    assert _do(h, I1, REG_IGNORE, 0, K1) == Status.GOOD
    assert _do(h, I2, REGISTER, 0, K2) == Status.GOOD
    return h


def test_register_rules() -> None:
    h = Harness().ready(I1, I2)
    assert _do(h, I1, REGISTER, 5, K1) == Status.RESERVATION_CONFLICT
    _registered(h)
    assert sorted(_keys(h)) == [K1, K2]
    assert _do(h, I1, REGISTER, K2, 7) == Status.RESERVATION_CONFLICT
    assert _do(h, I1, REGISTER, K1, 7) == Status.GOOD
    assert _do(h, I1, REGISTER, 7, 0) == Status.GOOD
    assert _keys(h) == [K2]
    gen = struct.unpack(">I", data_of(h.run(pr_in(0)))[:4])[0]
    assert gen == 4


def test_param_list_length_and_spec_i_pt() -> None:
    h = Harness().ready()
    cdb = struct.pack(">BBBxxIB", 0x5F, 0, 0, 20, 0)
    assert sense_of(h.run(cdb, bytes(20))) == (5, 0x1A, 0)
    cdb, params = pr_out(REG_IGNORE, 0, K1, 0, 0x08)
    assert sense_of(h.run(cdb, params))[:2] == (5, 0x26)
    assert sense_of(h.run(pr_in(4)))[:2] == (5, 0x24)


@pytest.mark.parametrize(
    ("pr_type", "reg_read", "reg_write", "unreg_read", "unreg_write"),
    [
        (PrType.WRITE_EXCLUSIVE, True, False, True, False),
        (PrType.EXCLUSIVE_ACCESS, False, False, False, False),
        (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, True, True, True, False),
        (PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY, True, True, False, False),
        (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, True, True, True, False),
        (PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS, True, True, False, False),
    ],
)
def test_conflict_table(
    pr_type: PrType, reg_read: bool, reg_write: bool, unreg_read: bool, unreg_write: bool
) -> None:
    h = _registered(Harness().ready(I1, I2))
    assert _do(h, I1, RESERVE, K1, 0, pr_type) == Status.GOOD
    res = data_of(h.run(pr_in(1)))
    assert struct.unpack(">I", res[4:8])[0] == 16 and res[21] & 0x0F == pr_type
    expected_key = 0 if pr_type.all_registrants else K1
    assert struct.unpack(">Q", res[8:16])[0] == expected_key

    def ok(result: Status) -> bool:
        assert result in (Status.GOOD, Status.RESERVATION_CONFLICT)
        return result == Status.GOOD

    assert ok(h.run(read10(0, 1)).status) and ok(h.run(write10(0, 1), bytes(512)).status)
    assert ok(h.run(read10(0, 1), nexus=I2).status) == reg_read
    assert ok(h.run(write10(0, 1), bytes(512), nexus=I2).status) == reg_write
    assert _do(h, I2, REGISTER, K2, 0) == Status.GOOD
    assert ok(h.run(read10(0, 1), nexus=I2).status) == unreg_read
    assert ok(h.run(write10(0, 1), bytes(512), nexus=I2).status) == unreg_write
    assert h.run(bytes(6), nexus=I2).status == Status.GOOD  # TEST UNIT READY is always allowed
    assert _do(h, I1, RELEASE, K1, 0, pr_type) == Status.GOOD
    assert h.run(write10(0, 1), bytes(512), nexus=I2).status == Status.GOOD


def test_reserve_conflicts_and_release_type_mismatch() -> None:
    h = _registered(Harness().ready(I1, I2))
    assert _do(h, I1, RESERVE, K1, 0, PrType.WRITE_EXCLUSIVE) == Status.GOOD
    assert _do(h, I1, RESERVE, K1, 0, PrType.WRITE_EXCLUSIVE) == Status.GOOD
    assert _do(h, I2, RESERVE, K2, 0, PrType.WRITE_EXCLUSIVE) == Status.RESERVATION_CONFLICT
    assert _do(h, I1, RESERVE, K1, 0, PrType.EXCLUSIVE_ACCESS) == Status.RESERVATION_CONFLICT
    cdb, params = pr_out(RELEASE, K1, 0, PrType.EXCLUSIVE_ACCESS)
    assert sense_of(h.run(cdb, params)) == (5, 0x26, 0x04)
    assert _do(h, I2, RELEASE, K2, 0, PrType.WRITE_EXCLUSIVE) == Status.GOOD  # not holder: no-op
    assert h.run(write10(0, 1), bytes(512), nexus=I2).status == Status.RESERVATION_CONFLICT
    cdb, params = pr_out(RESERVE, K1, 0, 0x02)
    assert sense_of(h.run(cdb, params))[:2] == (5, 0x24)
    assert h.run(bytes([0x16, 0, 0, 0, 0, 0]), nexus=I2).status == Status.RESERVATION_CONFLICT


def test_release_of_registrants_only_notifies_other_registrants() -> None:
    h = _registered(Harness().ready(I1, I2))
    assert _do(h, I1, RESERVE, K1, 0, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY) == Status.GOOD
    assert _do(h, I1, RELEASE, K1, 0, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY) == Status.GOOD
    assert sense_of(h.run(bytes(6), nexus=I2)) == (6, 0x2A, 0x04)
    assert h.run(bytes(6)).status == Status.GOOD


def test_preempt_removes_registration_and_takes_reservation() -> None:
    h = _registered(Harness().ready(I1, I2))
    assert _do(h, I2, RESERVE, K2, 0, PrType.EXCLUSIVE_ACCESS) == Status.GOOD
    assert _do(h, I1, PREEMPT, K1, 0x9999, PrType.WRITE_EXCLUSIVE) == Status.RESERVATION_CONFLICT
    assert _do(h, I1, PREEMPT, K1, K2, PrType.WRITE_EXCLUSIVE) == Status.GOOD
    assert _keys(h) == [K1]
    assert sense_of(h.run(bytes(6), nexus=I2)) == (6, 0x2A, 0x05)
    res = data_of(h.run(pr_in(1)))
    assert struct.unpack(">Q", res[8:16])[0] == K1 and res[21] == PrType.WRITE_EXCLUSIVE


def test_clear_drops_everything_and_notifies() -> None:
    h = _registered(Harness().ready(I1, I2))
    assert _do(h, I1, RESERVE, K1, 0, PrType.EXCLUSIVE_ACCESS) == Status.GOOD
    assert _do(h, I2, CLEAR, K1, 0) == Status.RESERVATION_CONFLICT
    assert _do(h, I2, CLEAR, K2, 0) == Status.GOOD
    assert _keys(h, I2) == []
    assert sense_of(h.run(bytes(6))) == (6, 0x2A, 0x03)
    assert h.run(read10(0, 1)).status == Status.GOOD


def test_all_registrants_reservation_survives_holder_unregistering() -> None:
    h = _registered(Harness().ready(I1, I2))
    assert _do(h, I1, RESERVE, K1, 0, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS) == Status.GOOD
    assert _do(h, I1, REGISTER, K1, 0) == Status.GOOD
    assert h.run(read10(0, 1)).status == Status.RESERVATION_CONFLICT
    assert h.run(read10(0, 1), nexus=I2).status == Status.GOOD
    assert _do(h, I2, REGISTER, K2, 0) == Status.GOOD
    assert h.run(read10(0, 1)).status == Status.GOOD


def test_report_capabilities_and_full_status() -> None:
    h = _registered(Harness().ready(I1, I2))
    caps = data_of(h.run(pr_in(2)))
    assert struct.unpack(">H", caps[:2])[0] == 8 and caps[2] & 0x04 and not caps[2] & 0x08
    assert caps[4] == 0xEA and caps[5] == 0x01
    assert _do(h, I1, RESERVE, K1, 0, PrType.WRITE_EXCLUSIVE) == Status.GOOD
    full = data_of(h.run(pr_in(3)))
    assert struct.unpack(">I", full[4:8])[0] == len(full) - 8
    pos, seen = 8, {}
    while pos < len(full):
        key, flags, scope_type, _port, tid_len = struct.unpack(">Q4xBB4xHI", full[pos : pos + 24])
        name = decode_transport_id(full[pos + 24 : pos + 24 + tid_len], 0)
        seen[name] = (key, flags & 1, scope_type)
        pos += 24 + tid_len
    assert seen[I1.initiator_port_name] == (K1, 1, PrType.WRITE_EXCLUSIVE)
    assert seen[I2.initiator_port_name] == (K2, 0, 0)


def test_register_and_move() -> None:
    h = _registered(Harness().ready(I1, I2))
    assert _do(h, I1, RESERVE, K1, 0, PrType.WRITE_EXCLUSIVE) == Status.GOOD
    tid = encode_transport_id(I2.initiator_port_name)
    params = struct.pack(">QQxBHI", K1, 0x3333, 0x02, 1, len(tid)) + tid
    cdb = struct.pack(">BBBxxIB", 0x5F, MOVE, PrType.EXCLUSIVE_ACCESS, len(params), 0)
    assert h.run(cdb, params).status == Status.GOOD
    assert sorted(_keys(h)) == [0x3333]
    assert h.run(read10(0, 1)).status == Status.RESERVATION_CONFLICT
    assert h.run(read10(0, 1), nexus=I2).status == Status.GOOD


def test_transport_id_round_trip() -> None:
    for name in ("iqn.a:b,i,0x1", "iqn.2024-01.example:" + "x" * 200 + ",i,0x23d000000001"):
        tid = encode_transport_id(name)
        assert len(tid) % 4 == 0 and len(tid) >= 24
        assert decode_transport_id(tid, 0) == name


def test_file_store_survives_restart_and_rejects_damage(tmp_path: Path) -> None:
    path = tmp_path / "pr.json"

    def make() -> LogicalUnit:
        store = FileReservationStore(path, volume="vol")
        return LogicalUnit(
            MemoryBlockDevice(64), LuIdentity(uuid.UUID(int=1)), StaticAlua.single(), store
        )

    lu = make()
    lu.execute(I1, bytes(6))
    cdb, params = pr_out(REG_IGNORE, 0, K1, 0, 0x01)
    assert lu.execute(I1, cdb, params).status == Status.GOOD
    cdb, params = pr_out(RESERVE, K1, 0, PrType.EXCLUSIVE_ACCESS)
    assert lu.execute(I1, cdb, params).status == Status.GOOD
    restarted = make()
    state = restarted.reservation_state
    assert state.aptpl and state.registrations[0].key == K1
    assert state.reservation == Reservation(I1.initiator_port_name, 1, PrType.EXCLUSIVE_ACCESS)
    restarted.execute(I2, bytes(6))
    assert restarted.execute(I2, read10(0, 1)).status == Status.RESERVATION_CONFLICT
    assert not list(tmp_path.glob(".pr.json.*"))
    for damage in (
        b"{",
        b'{"version": 1}',
        path.read_bytes().replace(b'"key": 4369', b'"key": -1'),
    ):
        path.write_bytes(damage)
        with pytest.raises(CorruptionError):
            FileReservationStore(path, volume="vol").load()
    holderless = PrState(
        1, (Registration("a,i,0x1", 1, 5),), Reservation("b,i,0x2", 1, PrType.WRITE_EXCLUSIVE)
    )
    path.write_bytes(state_to_json(holderless))
    with pytest.raises(CorruptionError):
        FileReservationStore(path, volume="vol").load()
    assert FileReservationStore(tmp_path / "missing.json", volume="v").load() == PrState()
