"""PERSISTENT RESERVE IN/OUT (SPC-4 §6.15, §6.16) as pure functions over :class:`PrState`.

Nothing here touches a store or a queue: ``pr_out`` returns the new state and the unit
attentions to raise, and the logical unit saves and delivers them under its lock.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Final

from blockyard.scsi.constants import (
    INSUFFICIENT_REGISTRATION_RESOURCES,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    PARAMETER_LIST_LENGTH_ERROR,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    AscPair,
)
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.reservations import (
    PORT_NAME_BYTES_MAX,
    REGISTRATIONS_MAX,
    PrState,
    PrType,
    Registration,
    Reservation,
)
from blockyard.scsi.sense import (
    GOOD,
    RESERVATION_CONFLICT,
    CommandError,
    ScsiResult,
    cdb_error,
    illegal,
    param_error,
)


class PrInAction(IntEnum):
    """SPC-4 §6.15.1 Table 163."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrOutAction(IntEnum):
    """SPC-4 §6.16.1 Table 183."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


# SPC-4 §6.16.3: the basic PERSISTENT RESERVE OUT parameter list is exactly 24 bytes.
PR_OUT_BASIC_PARAM_LEN: Final = 24
# SPC-4 §6.16.4: REGISTER AND MOVE header precedes the TransportID.
PR_OUT_MOVE_HEADER_LEN: Final = 24
# TransportID of the longest iSCSI port name, rounded to 4 (SPC-4 §7.6.4.6).
TRANSPORT_ID_BYTES_MAX: Final = 4 + ((PORT_NAME_BYTES_MAX + 1 + 3) // 4) * 4
PR_OUT_PARAM_LEN_MAX: Final = PR_OUT_MOVE_HEADER_LEN + TRANSPORT_ID_BYTES_MAX
# SPC-4 §7.6.4.6 Table 434: iSCSI protocol identifier and TransportID formats.
PROTOCOL_ID_ISCSI: Final = 0x5
TRANSPORT_ID_FORMAT_NAME: Final = 0x0
TRANSPORT_ID_FORMAT_PORT: Final = 0x1
SCOPE_LU: Final = 0x0

_U64 = struct.Struct(">Q")
_PR_OUT_PARAMS = struct.Struct(">QQ4xBx2x")
_PR_OUT_MOVE = struct.Struct(">QQxBHI")
_READ_RES = struct.Struct(">IIQ4xxB2x")
_FULL_DESC = struct.Struct(">Q4xBB4xHI")

UaTarget = tuple[Registration, AscPair]


@dataclass(frozen=True, slots=True)
class PrOutOutcome:
    """``state`` is None when nothing changed (nothing to save)."""

    result: ScsiResult
    state: PrState | None = None
    unit_attentions: tuple[UaTarget, ...] = ()


def encode_transport_id(initiator_port_name: str) -> bytes:
    """iSCSI TransportID, format 01b (name with ISID), null-terminated and padded to 4."""
    name = initiator_port_name.encode()[:PORT_NAME_BYTES_MAX] + b"\x00"
    name += bytes(-len(name) % 4)
    # SPC-4 §7.6.4.6: ADDITIONAL LENGTH is at least 20.
    if len(name) < 20:
        name += bytes(20 - len(name))
    header = bytes([(TRANSPORT_ID_FORMAT_PORT << 6) | PROTOCOL_ID_ISCSI, 0])
    return header + len(name).to_bytes(2, "big") + name


def decode_transport_id(data: bytes, base: int) -> str:
    """The initiator port name in an iSCSI TransportID; errors point at ``base`` + offset."""
    if len(data) < 4:
        raise illegal(PARAMETER_LIST_LENGTH_ERROR)
    if data[0] & 0x0F != PROTOCOL_ID_ISCSI:
        raise param_error(base)
    fmt = data[0] >> 6
    length = int.from_bytes(data[2:4], "big")
    if length > len(data) - 4 or length > TRANSPORT_ID_BYTES_MAX:
        raise param_error(base + 2)
    raw = bytes(data[4 : 4 + length]).split(b"\x00", 1)[0]
    try:
        name = raw.decode()
    except UnicodeDecodeError as exc:
        raise param_error(base + 4) from exc
    if fmt == TRANSPORT_ID_FORMAT_PORT:
        if ",i,0x" not in name.lower():
            raise param_error(base + 4)
    else:
        # Format 00b names every port of an initiator; moving a reservation needs one port.
        raise param_error(base, 7)
    if not name:
        raise param_error(base + 4)
    return name


def _type_scope(state_type: PrType) -> int:
    return (SCOPE_LU << 4) | int(state_type)


def pr_in(state: PrState, action: int, *, ptpl_capable: bool = True) -> bytes:
    """Full parameter data for a PERSISTENT RESERVE IN service action (before truncation)."""
    if action == PrInAction.READ_KEYS:
        keys = b"".join(_U64.pack(r.key) for r in state.registrations)
        return struct.pack(">II", state.generation, len(keys)) + keys
    if action == PrInAction.READ_RESERVATION:
        res = state.reservation
        if res is None:
            return struct.pack(">II", state.generation, 0)
        key = 0
        if not res.type.all_registrants:
            holder = state.find(res.initiator_port_name, res.relative_target_port_id)
            key = 0 if holder is None else holder.key
        return _READ_RES.pack(state.generation, 16, key, _type_scope(res.type))
    if action == PrInAction.REPORT_CAPABILITIES:
        # SPC-4 §6.15.4: CRH=1 (RESERVE/RELEASE yield to persistent reservations), ATP_C=1,
        # PTPL_C; TMV=1 with ALLOW COMMANDS 000b; the six supported types.
        caps = 0x10 | 0x04 | (0x01 if ptpl_capable else 0)
        flags = 0x80 | (0x01 if state.aptpl else 0)
        type_mask = 0x80 | 0x40 | 0x20 | 0x08 | 0x02
        return struct.pack(">HBBBBH", 8, caps, flags, type_mask, 0x01, 0)
    if action == PrInAction.READ_FULL_STATUS:
        body = bytearray()
        for reg in state.registrations:
            tid = encode_transport_id(reg.initiator_port_name)
            holds = state.is_holder(reg.initiator_port_name, reg.relative_target_port_id)
            res = state.reservation
            scope_type = _type_scope(res.type) if holds and res is not None else 0
            flags = (0x02 if reg.all_tg_pt else 0) | (0x01 if holds else 0)
            body += _FULL_DESC.pack(
                reg.key, flags, scope_type, reg.relative_target_port_id, len(tid)
            )
            body += tid
        return struct.pack(">II", state.generation, len(body)) + bytes(body)
    raise cdb_error(1, 4)


def _bump(state: PrState, **changes: object) -> PrState:
    return replace(state, generation=(state.generation + 1) & 0xFFFFFFFF, **changes)  # type: ignore[arg-type]


def _without(state: PrState, removed: list[Registration]) -> tuple[Registration, ...]:
    return tuple(r for r in state.registrations if r not in removed)


def _unregister(state: PrState, me: Registration) -> tuple[PrState, tuple[UaTarget, ...]]:
    """SPC-4 §5.12.11.2.3: removing a registration may release the reservation."""
    regs = _without(state, [me])
    res = state.reservation
    uas: tuple[UaTarget, ...] = ()
    if res is not None:
        if res.type.all_registrants:
            if not regs:
                res = None
            elif res.initiator_port_name == me.initiator_port_name and me.matches(
                res.initiator_port_name, res.relative_target_port_id
            ):
                # Keep the reservation anchored to a registrant that still exists.
                res = Reservation(
                    regs[0].initiator_port_name, regs[0].relative_target_port_id, res.type
                )
        elif me.matches(res.initiator_port_name, res.relative_target_port_id):
            if res.type.registrants_only_or_all:
                uas = tuple((r, RESERVATIONS_RELEASED) for r in regs)
            res = None
    return _bump(state, registrations=regs, reservation=res), uas


def pr_out(
    state: PrState, nexus: Nexus, cdb: bytes | memoryview, params: bytes | memoryview
) -> PrOutOutcome:
    """Apply one PERSISTENT RESERVE OUT. ``params`` is exactly the parameter list sent."""
    action = cdb[1] & 0x1F
    scope = cdb[2] >> 4
    type_code = cdb[2] & 0x0F
    if action > PrOutAction.REGISTER_AND_MOVE:
        raise cdb_error(1, 4)
    if action == PrOutAction.REGISTER_AND_MOVE:
        return _register_and_move(state, nexus, scope, type_code, params)
    if len(params) != PR_OUT_BASIC_PARAM_LEN:
        raise illegal(PARAMETER_LIST_LENGTH_ERROR)
    rk, sark, flags = _PR_OUT_PARAMS.unpack_from(params)
    spec_i_pt = bool(flags & 0x08)
    all_tg_pt = bool(flags & 0x04)
    aptpl = bool(flags & 0x01)
    if flags & 0xF2:
        raise param_error(20, 7 if flags & 0x80 else None)
    if spec_i_pt:
        # SPC-4 §6.16.3: SPEC_I_PT is optional; REPORT CAPABILITIES reports SIP_C=0.
        raise param_error(20, 3)
    me_name = nexus.initiator_port_name
    me_port = nexus.relative_target_port_id
    me = state.find(me_name, me_port)

    if action in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
        if action == PrOutAction.REGISTER and rk != (0 if me is None else me.key):
            return PrOutOutcome(RESERVATION_CONFLICT)
        if me is None:
            if sark == 0:
                return PrOutOutcome(GOOD)
            if len(state.registrations) >= REGISTRATIONS_MAX:
                raise illegal(INSUFFICIENT_REGISTRATION_RESOURCES)
            reg = Registration(me_name, me_port, sark, all_tg_pt)
            return PrOutOutcome(
                GOOD, _bump(state, registrations=(*state.registrations, reg), aptpl=aptpl)
            )
        if all_tg_pt != me.all_tg_pt and sark != 0:
            # SPC-4 §5.12.7: ALL_TG_PT is only honoured when a registration is made.
            raise param_error(20, 2)
        if sark == 0:
            new_state, uas = _unregister(state, me)
            return PrOutOutcome(GOOD, replace(new_state, aptpl=aptpl), uas)
        regs = tuple(replace(r, key=sark) if r == me else r for r in state.registrations)
        return PrOutOutcome(GOOD, _bump(state, registrations=regs, aptpl=aptpl))

    if all_tg_pt:
        raise param_error(20, 2)
    if me is None or rk != me.key:
        return PrOutOutcome(RESERVATION_CONFLICT)
    if action in (
        PrOutAction.RESERVE,
        PrOutAction.RELEASE,
        PrOutAction.PREEMPT,
        PrOutAction.PREEMPT_AND_ABORT,
    ):
        if scope != SCOPE_LU:
            raise cdb_error(2, 7)
        try:
            PrType(type_code)
        except ValueError as exc:
            raise cdb_error(2, 3) from exc

    res = state.reservation
    if action == PrOutAction.RESERVE:
        pr_type = PrType(type_code)
        if res is None:
            return PrOutOutcome(
                GOOD, replace(state, reservation=Reservation(me_name, me_port, pr_type))
            )
        if state.is_holder(me_name, me_port) and res.type == pr_type:
            return PrOutOutcome(GOOD)
        return PrOutOutcome(RESERVATION_CONFLICT)

    if action == PrOutAction.RELEASE:
        if res is None or not state.is_holder(me_name, me_port):
            return PrOutOutcome(GOOD)
        if res.type != type_code:
            raise illegal(INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        released: tuple[UaTarget, ...] = ()
        if res.type.registrants_only_or_all:
            released = tuple((r, RESERVATIONS_RELEASED) for r in state.registrations if r != me)
        return PrOutOutcome(GOOD, replace(state, reservation=None), released)

    if action == PrOutAction.CLEAR:
        uas = tuple((r, RESERVATIONS_PREEMPTED) for r in state.registrations if r != me)
        return PrOutOutcome(GOOD, _bump(state, registrations=(), reservation=None), uas)

    # PREEMPT and PREEMPT AND ABORT (SPC-4 §5.12.11.4); aborting tasks is the transport's part.
    return _preempt(state, me, sark, type_code)


def _preempt(state: PrState, me: Registration, sark: int, type_code: int) -> PrOutOutcome:
    res = state.reservation
    if res is None or res.type.all_registrants:
        if sark == 0:
            if res is None:
                raise param_error(8)
            removed = [r for r in state.registrations if r != me]
            new_res = Reservation(
                me.initiator_port_name, me.relative_target_port_id, PrType(type_code)
            )
            uas = tuple((r, REGISTRATIONS_PREEMPTED) for r in removed)
            return PrOutOutcome(GOOD, _bump(state, registrations=(me,), reservation=new_res), uas)
        removed = [r for r in state.registrations if r.key == sark and r != me]
        if not removed:
            return PrOutOutcome(RESERVATION_CONFLICT)
        regs = _without(state, removed)
        new_res2 = res
        if res is not None and not any(
            r.matches(res.initiator_port_name, res.relative_target_port_id) for r in regs
        ):
            new_res2 = Reservation(me.initiator_port_name, me.relative_target_port_id, res.type)
        uas = tuple((r, REGISTRATIONS_PREEMPTED) for r in removed)
        return PrOutOutcome(GOOD, _bump(state, registrations=regs, reservation=new_res2), uas)

    holder = state.find(res.initiator_port_name, res.relative_target_port_id)
    holder_key = None if holder is None else holder.key
    if sark == holder_key:
        removed = [r for r in state.registrations if r.key == sark and r != me]
        regs = _without(state, removed)
        new_type = PrType(type_code)
        uas_list: list[UaTarget] = [(r, REGISTRATIONS_PREEMPTED) for r in removed]
        if new_type != res.type:
            uas_list += [(r, RESERVATIONS_RELEASED) for r in regs if r != me]
        new_res = Reservation(me.initiator_port_name, me.relative_target_port_id, new_type)
        return PrOutOutcome(
            GOOD, _bump(state, registrations=regs, reservation=new_res), tuple(uas_list)
        )
    if sark == 0:
        raise param_error(8)
    removed = [r for r in state.registrations if r.key == sark and r != me]
    if not removed:
        return PrOutOutcome(RESERVATION_CONFLICT)
    uas = tuple((r, REGISTRATIONS_PREEMPTED) for r in removed)
    return PrOutOutcome(GOOD, _bump(state, registrations=_without(state, removed)), uas)


def _register_and_move(
    state: PrState, nexus: Nexus, scope: int, type_code: int, params: bytes | memoryview
) -> PrOutOutcome:
    if len(params) < PR_OUT_MOVE_HEADER_LEN:
        raise illegal(PARAMETER_LIST_LENGTH_ERROR)
    rk, sark, flags, rel_port, tid_len = _PR_OUT_MOVE.unpack_from(params)
    if flags & 0xFC:
        raise param_error(17)
    unreg = bool(flags & 0x02)
    aptpl = bool(flags & 0x01)
    if PR_OUT_MOVE_HEADER_LEN + tid_len > len(params):
        raise illegal(PARAMETER_LIST_LENGTH_ERROR)
    me = state.find(nexus.initiator_port_name, nexus.relative_target_port_id)
    if me is None or rk != me.key:
        return PrOutOutcome(RESERVATION_CONFLICT)
    if me.all_tg_pt:
        # SPC-4 §5.12.8: a registration made with ALL_TG_PT cannot be moved.
        raise param_error(20)
    if sark == 0:
        raise param_error(8)
    if scope != SCOPE_LU:
        raise cdb_error(2, 7)
    try:
        pr_type = PrType(type_code)
    except ValueError as exc:
        raise cdb_error(2, 3) from exc
    res = state.reservation
    if res is None:
        raise param_error(0)
    if not state.is_holder(nexus.initiator_port_name, nexus.relative_target_port_id):
        return PrOutOutcome(RESERVATION_CONFLICT)
    if res.type.all_registrants:
        return PrOutOutcome(RESERVATION_CONFLICT)
    dest_name = decode_transport_id(
        bytes(params[PR_OUT_MOVE_HEADER_LEN : PR_OUT_MOVE_HEADER_LEN + tid_len]),
        PR_OUT_MOVE_HEADER_LEN,
    )
    if dest_name == nexus.initiator_port_name and rel_port == nexus.relative_target_port_id:
        raise param_error(PR_OUT_MOVE_HEADER_LEN + 4)
    dest = state.find(dest_name, rel_port)
    regs = list(state.registrations)
    if dest is None:
        if len(regs) >= REGISTRATIONS_MAX:
            raise illegal(INSUFFICIENT_REGISTRATION_RESOURCES)
        regs.append(Registration(dest_name, rel_port, sark))
    else:
        regs = [replace(r, key=sark) if r == dest else r for r in regs]
    if unreg:
        regs = [r for r in regs if r != me]
    new_res = Reservation(dest_name, rel_port, pr_type)
    return PrOutOutcome(
        GOOD, _bump(state, registrations=tuple(regs), reservation=new_res, aptpl=aptpl)
    )


def check_pr_out_param_length(length: int) -> None:
    """Refuse parameter lists no PR OUT service action can use (CDB bytes 5..8)."""
    if length > PR_OUT_PARAM_LEN_MAX:
        raise cdb_error(5)


__all__ = [
    "PR_OUT_PARAM_LEN_MAX",
    "CommandError",
    "PrInAction",
    "PrOutAction",
    "PrOutOutcome",
    "check_pr_out_param_length",
    "decode_transport_id",
    "encode_transport_id",
    "pr_in",
    "pr_out",
]
