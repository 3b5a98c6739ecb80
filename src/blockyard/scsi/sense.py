"""Command outcomes: :class:`ScsiResult` and fixed-format sense data (SPC-4 §4.5.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from blockyard.scsi.constants import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    AscPair,
    SenseKey,
    Status,
)

# SPC-4 §4.5.3 Table 45: fixed format, current error; 18 bytes with ADDITIONAL SENSE LENGTH 10.
SENSE_RESPONSE_CODE_FIXED_CURRENT: Final = 0x70
SENSE_FIXED_LENGTH: Final = 18
SENSE_ADDITIONAL_LENGTH: Final = SENSE_FIXED_LENGTH - 8


@dataclass(frozen=True, slots=True)
class FieldPointer:
    """SPC-4 §4.5.2.4.2 sense-key specific field pointer.

    ``in_cdb`` selects C/D: True points into the CDB, False into the parameter list.
    """

    byte: int
    bit: int | None = None
    in_cdb: bool = True


def build_sense(
    key: SenseKey,
    asc: AscPair,
    *,
    information: int | None = None,
    field: FieldPointer | None = None,
) -> bytes:
    """Return 18 bytes of fixed-format sense data.

    ``information`` sets VALID and the 4-byte INFORMATION field (miscompare offsets, LBAs).
    """
    sense = bytearray(SENSE_FIXED_LENGTH)
    sense[0] = SENSE_RESPONSE_CODE_FIXED_CURRENT
    sense[2] = int(key) & 0x0F
    if information is not None:
        sense[0] |= 0x80
        sense[3:7] = (information & 0xFFFFFFFF).to_bytes(4, "big")
    sense[7] = SENSE_ADDITIONAL_LENGTH
    sense[12], sense[13] = asc
    if field is not None:
        sks = 0x80
        if field.in_cdb:
            sks |= 0x40
        if field.bit is not None:
            sks |= 0x08 | (field.bit & 0x07)
        sense[15] = sks
        sense[16:18] = (field.byte & 0xFFFF).to_bytes(2, "big")
    return bytes(sense)


DataIn = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """What the transport sends back for one command.

    ``data_in`` is already trimmed to the CDB's allocation length (or is the exact READ
    payload); ``sense`` is present exactly when ``status`` is CHECK CONDITION.
    """

    status: Status
    sense: bytes | None = None
    data_in: DataIn | None = None

    @property
    def sense_key(self) -> int | None:
        return None if self.sense is None else self.sense[2] & 0x0F

    @property
    def asc_ascq(self) -> AscPair | None:
        return None if self.sense is None else (self.sense[12], self.sense[13])


GOOD: Final = ScsiResult(Status.GOOD)
BUSY: Final = ScsiResult(Status.BUSY)
TASK_SET_FULL: Final = ScsiResult(Status.TASK_SET_FULL)
RESERVATION_CONFLICT: Final = ScsiResult(Status.RESERVATION_CONFLICT)


def check_condition(
    key: SenseKey,
    asc: AscPair,
    *,
    information: int | None = None,
    field: FieldPointer | None = None,
) -> ScsiResult:
    return ScsiResult(
        Status.CHECK_CONDITION,
        build_sense(key, asc, information=information, field=field),
    )


class CommandError(Exception):
    """Internal unwinding: a handler ends its command with ``result``.

    Never escapes :meth:`LogicalUnit.execute`; it exists so deep parsing code can stop a
    command without threading return values through every helper.
    """

    def __init__(self, result: ScsiResult) -> None:
        super().__init__(result.asc_ascq)
        self.result = result


def cdb_error(
    byte: int, bit: int | None = None, asc: AscPair = INVALID_FIELD_IN_CDB
) -> CommandError:
    """ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at ``byte`` (and ``bit``)."""
    return CommandError(
        check_condition(SenseKey.ILLEGAL_REQUEST, asc, field=FieldPointer(byte, bit, in_cdb=True))
    )


def param_error(
    byte: int, bit: int | None = None, asc: AscPair = INVALID_FIELD_IN_PARAMETER_LIST
) -> CommandError:
    """ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at ``byte`` (and ``bit``)."""
    return CommandError(
        check_condition(SenseKey.ILLEGAL_REQUEST, asc, field=FieldPointer(byte, bit, in_cdb=False))
    )


def illegal(asc: AscPair) -> CommandError:
    """ILLEGAL REQUEST with ``asc`` and no field pointer."""
    return CommandError(check_condition(SenseKey.ILLEGAL_REQUEST, asc))
