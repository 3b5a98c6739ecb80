"""Sans-IO SCSI target command layer (SPC-4, SBC-4) over a :class:`~blockyard.blockdev.BlockDevice`.

The transport (iSCSI) calls :meth:`LogicalUnit.inspect` when a command arrives, to learn how
much Data-Out to solicit, then :meth:`LogicalUnit.execute` with the data, and sends back the
:class:`ScsiResult`. Nothing here does network I/O.
"""

from blockyard.scsi.alua import AccessState, AluaProvider, StaticAlua, TargetPortGroup
from blockyard.scsi.commands import CommandInfo, Direction, inspect
from blockyard.scsi.constants import SenseKey, Status
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu import LogicalUnit, ResetKind
from blockyard.scsi.nexus import Nexus
from blockyard.scsi.reservations import (
    FileReservationStore,
    MemoryReservationStore,
    PrState,
    ReservationStore,
)
from blockyard.scsi.sense import ScsiResult

__all__ = [
    "AccessState",
    "AluaProvider",
    "CommandInfo",
    "Direction",
    "FileReservationStore",
    "LogicalUnit",
    "LuIdentity",
    "MemoryReservationStore",
    "Nexus",
    "PrState",
    "ReservationStore",
    "ResetKind",
    "ScsiResult",
    "SenseKey",
    "StaticAlua",
    "Status",
    "TargetPortGroup",
    "inspect",
]
