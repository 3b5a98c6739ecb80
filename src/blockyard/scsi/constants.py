"""SCSI numbers: operation codes, status codes, sense keys and additional sense codes.

Every value carries the section of the standard it comes from. ASC/ASCQ pairs are kept as
``(asc, ascq)`` tuples so a sense code is one name, never two loose numbers.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class Status(IntEnum):
    """SAM-5 §5.3.1 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    """SPC-4 §4.5.6 Table 48 sense keys."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


AscPair = tuple[int, int]

# SPC-4 Annex D.2 (ASC and ASCQ assignments).
NO_ADDITIONAL_SENSE: Final[AscPair] = (0x00, 0x00)
LU_NOT_READY_CAUSE_NOT_REPORTABLE: Final[AscPair] = (0x04, 0x00)
LU_NOT_ACCESSIBLE_TRANSITION: Final[AscPair] = (0x04, 0x0A)  # asymmetric access state transition
LU_NOT_ACCESSIBLE_STANDBY: Final[AscPair] = (0x04, 0x0B)  # target port in standby state
LU_NOT_ACCESSIBLE_UNAVAILABLE: Final[AscPair] = (0x04, 0x0C)  # target port in unavailable state
WRITE_ERROR: Final[AscPair] = (0x0C, 0x00)
UNRECOVERED_READ_ERROR: Final[AscPair] = (0x11, 0x00)
MISCOMPARE_DURING_VERIFY: Final[AscPair] = (0x1D, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Final[AscPair] = (0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE: Final[AscPair] = (0x20, 0x00)
LBA_OUT_OF_RANGE: Final[AscPair] = (0x21, 0x00)
INVALID_FIELD_IN_CDB: Final[AscPair] = (0x24, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: Final[AscPair] = (0x26, 0x00)
INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Final[AscPair] = (0x26, 0x04)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Final[AscPair] = (0x27, 0x07)
POWER_ON_RESET_OCCURRED: Final[AscPair] = (0x29, 0x00)
POWER_ON_OCCURRED: Final[AscPair] = (0x29, 0x01)
SCSI_BUS_RESET_OCCURRED: Final[AscPair] = (0x29, 0x02)
BUS_DEVICE_RESET_OCCURRED: Final[AscPair] = (0x29, 0x03)
I_T_NEXUS_LOSS_OCCURRED: Final[AscPair] = (0x29, 0x07)
MODE_PARAMETERS_CHANGED: Final[AscPair] = (0x2A, 0x01)
RESERVATIONS_PREEMPTED: Final[AscPair] = (0x2A, 0x03)
RESERVATIONS_RELEASED: Final[AscPair] = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED: Final[AscPair] = (0x2A, 0x05)
ASYMMETRIC_ACCESS_STATE_CHANGED: Final[AscPair] = (0x2A, 0x06)
CAPACITY_DATA_HAS_CHANGED: Final[AscPair] = (0x2A, 0x09)
#: SBC-4 §4.7.3.7.3: the thin-provisioned resources backing the LU fell below the soft threshold
#: (Linux raises the SDEV_UA uevent THIN_PROVISIONING_SOFT_THRESHOLD_REACHED for it).
THIN_PROVISIONING_SOFT_THRESHOLD_REACHED: Final[AscPair] = (0x38, 0x07)
SAVING_PARAMETERS_NOT_SUPPORTED: Final[AscPair] = (0x39, 0x00)
INTERNAL_TARGET_FAILURE: Final[AscPair] = (0x44, 0x00)
INSUFFICIENT_REGISTRATION_RESOURCES: Final[AscPair] = (0x55, 0x04)


class Op(IntEnum):
    """Operation codes served (SPC-4 Annex E, SBC-4 §5)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF


# SBC-4 §5.16 / §5.8: SERVICE ACTION IN (16) service actions.
SAI_READ_CAPACITY_16: Final = 0x10
SAI_GET_LBA_STATUS: Final = 0x12
# SPC-4 §6.17 / §6.35 / §6.36: MAINTENANCE IN service actions.
MI_REPORT_TARGET_PORT_GROUPS: Final = 0x0A
MI_REPORT_SUPPORTED_OPCODES: Final = 0x0C
MI_REPORT_SUPPORTED_TMFS: Final = 0x0D
