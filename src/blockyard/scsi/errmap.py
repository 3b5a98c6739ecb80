"""The one place blockyard errors become SCSI answers, logged with the LBA at the boundary.

| error                        | answer                                                   |
|------------------------------|----------------------------------------------------------|
| OutOfRangeError              | ILLEGAL REQUEST / LBA OUT OF RANGE (05/21/00)            |
| TransferTooLargeError        | ILLEGAL REQUEST / INVALID FIELD IN CDB (05/24/00)        |
| MisalignedError, other       | ILLEGAL REQUEST / INVALID FIELD IN CDB                   |
|   InvalidArgumentError       |                                                          |
| NoSpaceError                 | DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT     |
|                              | (07/27/07), SBC-4 §4.7.3.6                               |
| LeaseExpiredError            | NOT READY / ASYMMETRIC ACCESS STATE TRANSITION (02/04/0A)|
| FencedError, other           | NOT READY / TARGET PORT IN STANDBY STATE (02/04/0B)      |
| VolumeClosedError            | NOT READY / TARGET PORT IN UNAVAILABLE STATE (02/04/0C)  |
| CorruptionError              | MEDIUM ERROR / UNRECOVERED READ ERROR (03/11/00)         |
| StorageIOError on read       | MEDIUM ERROR / UNRECOVERED READ ERROR (03/11/00)         |
| StorageIOError on write/sync | MEDIUM ERROR / WRITE ERROR (03/0C/00)                    |
| WalFullTimeoutError          | TASK SET FULL                                            |
| FlushTimeoutError, other     | BUSY                                                     |
|   BlockyardTimeoutError      |                                                          |
| any other BlockyardError     | HARDWARE ERROR / INTERNAL TARGET FAILURE (04/44/00)      |

Why these choices:

- Fenced: a stale epoch means this server is no longer the primary. 04/0B says "this port is in
  standby", which Linux scsi_dh_alua and dm-multipath treat as a path failure: they re-read
  REPORT TARGET PORT GROUPS and move I/O to the active path. 04/0A (transitioning) would make
  the initiator retry the same path instead, which cannot succeed.
- Lease expired (a primary run by a master that has lost touch with the master and its
  replicas): the state is in flux — the lease may come back in a moment, or the master moves
  the volume elsewhere and this port becomes standby. 04/0A (T10 ASC list: LOGICAL UNIT NOT
  ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION; SPC-4 asymmetric logical unit access,
  transitioning state) makes the initiator retry and re-read REPORT TARGET PORT GROUPS, which
  suits both outcomes. Never silence: the initiator learns at once.
- WAL full: back-pressure. TASK SET FULL makes the initiator retry *and* lower its queue depth
  (Linux scsi_track_queue_full), which is exactly the relief the WAL needs.
- Flush timeout: a transient stall with nothing to shed. BUSY is retried without changing the
  queue depth.
"""

from __future__ import annotations

import logging
from enum import Enum

from blockyard.errors import (
    BlockyardError,
    BlockyardTimeoutError,
    CorruptionError,
    FencedError,
    InvalidArgumentError,
    LeaseExpiredError,
    NoSpaceError,
    OutOfRangeError,
    StorageIOError,
    VolumeClosedError,
    WalFullTimeoutError,
)
from blockyard.scsi.constants import (
    INTERNAL_TARGET_FAILURE,
    INVALID_FIELD_IN_CDB,
    LBA_OUT_OF_RANGE,
    LU_NOT_ACCESSIBLE_STANDBY,
    LU_NOT_ACCESSIBLE_TRANSITION,
    LU_NOT_ACCESSIBLE_UNAVAILABLE,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    SenseKey,
)
from blockyard.scsi.sense import BUSY, TASK_SET_FULL, ScsiResult, check_condition

log = logging.getLogger("blockyard.scsi")


class IoKind(Enum):
    READ = "read"
    WRITE = "write"


def error_to_result(
    exc: BlockyardError, *, command: str, lba: int | None, kind: IoKind, volume: str
) -> ScsiResult:
    """Translate ``exc`` raised while serving ``command`` and log it with the LBA."""
    where = f"{command} volume={volume} lba={lba}"
    if isinstance(exc, OutOfRangeError):
        log.info("%s: %s", where, exc)
        return check_condition(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
    if isinstance(exc, InvalidArgumentError):
        log.info("%s: %s", where, exc)
        return check_condition(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
    if isinstance(exc, NoSpaceError):
        log.error("%s: out of space: %s", where, exc)
        return check_condition(SenseKey.DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    if isinstance(exc, LeaseExpiredError):
        log.warning("%s: no lease, answering transitioning: %s", where, exc)
        return check_condition(SenseKey.NOT_READY, LU_NOT_ACCESSIBLE_TRANSITION)
    if isinstance(exc, FencedError):
        log.warning("%s: fenced, telling the initiator to fail over: %s", where, exc)
        return check_condition(SenseKey.NOT_READY, LU_NOT_ACCESSIBLE_STANDBY)
    if isinstance(exc, VolumeClosedError):
        log.warning("%s: volume closed: %s", where, exc)
        return check_condition(SenseKey.NOT_READY, LU_NOT_ACCESSIBLE_UNAVAILABLE)
    if isinstance(exc, CorruptionError):
        log.error("%s: corrupt data: %s", where, exc)
        return check_condition(SenseKey.MEDIUM_ERROR, UNRECOVERED_READ_ERROR, information=lba)
    if isinstance(exc, StorageIOError):
        log.error("%s: I/O error: %s (cause: %r)", where, exc, exc.__cause__)
        asc = UNRECOVERED_READ_ERROR if kind is IoKind.READ else WRITE_ERROR
        return check_condition(SenseKey.MEDIUM_ERROR, asc, information=lba)
    if isinstance(exc, WalFullTimeoutError):
        log.warning("%s: WAL full, answering TASK SET FULL: %s", where, exc)
        return TASK_SET_FULL
    if isinstance(exc, BlockyardTimeoutError):
        log.warning("%s: timed out, answering BUSY: %s", where, exc)
        return BUSY
    log.error("%s: unexpected operating error: %r", where, exc)
    return check_condition(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE)
