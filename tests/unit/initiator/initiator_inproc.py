"""An in-process blockyard target on loopback for the initiator's unit tests: the real
IscsiServer and LogicalUnit over memory devices, on the test's own event loop."""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from blockyard.attach.initiator import InitiatorSettings
from blockyard.blockdev import BytesLike
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.discovery import Portal
from blockyard.iscsi.login import TargetConfig
from blockyard.iscsi.target_session import SessionLimits
from blockyard.scsi.alua import StaticAlua
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.reservations import MemoryReservationStore
from blockyard.server.iscsi_server import (
    DictTargetRegistry,
    IscsiServer,
    ServedTarget,
    ServerSettings,
)
from blockyard.testing.memdev import MemoryBlockDevice

PREFIX = "iqn.2026-11.io.blockyard"
INITIATOR = "iqn.2026-11.io.blockyard.test:unit"
BLOCKS = 8192


class GatedDevice(MemoryBlockDevice):
    """Blocks FUA writes and flushes until ``gate`` is set, so a command can be made to hang.
    (The logical unit runs a FUA write as a write then a flush, so the flush is what hangs.)"""

    def __init__(self, block_count: int) -> None:
        super().__init__(block_count)
        self.gate = threading.Event()
        self.gate.set()

    def write(self, lba: int, data: BytesLike, *, fua: bool = False) -> None:
        if fua:
            self.gate.wait(10)
        super().write(lba, data, fua=fua)

    def flush(self) -> None:
        self.gate.wait(10)
        super().flush()


@dataclass
class InProcTarget:
    server: IscsiServer
    devices: dict[str, GatedDevice]

    @property
    def portal(self) -> Portal:
        return Portal("127.0.0.1", self.server.port)


def target_name(name: str) -> str:
    return f"{PREFIX}:{name}"


def settings(**overrides: object) -> InitiatorSettings:
    values: dict[str, object] = {
        "initiator_name": INITIATOR,
        "connect_timeout_s": 2.0,
        "login_timeout_s": 3.0,
        "command_timeout_s": 3.0,
        "tmf_timeout_s": 3.0,
        "logout_timeout_s": 2.0,
    }
    values.update(overrides)
    return InitiatorSettings(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def inproc_target(
    names: tuple[str, ...] = ("vol",),
    *,
    chap: ChapCredentials | None = None,
    mutual_chap: ChapCredentials | None = None,
    limits: SessionLimits | None = None,
) -> AsyncIterator[InProcTarget]:
    devices: dict[str, GatedDevice] = {}
    targets = []
    for name in names:
        device = GatedDevice(BLOCKS)
        devices[name] = device
        lu = LogicalUnit(
            device, LuIdentity(uuid.uuid4()), StaticAlua.single(), MemoryReservationStore()
        )
        config = TargetConfig(target_name(name), chap=chap, mutual_chap=mutual_chap)
        targets.append(ServedTarget(config, lu))
    server = IscsiServer(
        DictTargetRegistry(targets),
        "127.0.0.1",
        0,
        settings=ServerSettings(limits=limits or SessionLimits()),
    )
    await server.start()
    try:
        yield InProcTarget(server, devices)
    finally:
        for device in devices.values():
            device.gate.set()
        await server.close(2.0)
