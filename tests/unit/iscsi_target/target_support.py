"""Helpers for the sans-IO target connection tests: a portal over an in-memory logical unit,
a fake clock, and an initiator that logs in and talks PDUs through the real codec."""

from __future__ import annotations

import itertools
import struct
import uuid
from dataclasses import dataclass, field

from blockyard.iscsi.discovery import DiscoveryTarget, Portal, send_targets_pairs
from blockyard.iscsi.login import (
    InitiatorLogin,
    InitiatorLoginSettings,
    TargetConfig,
    TargetLoginSettings,
)
from blockyard.iscsi.negotiation import OperationalSettings
from blockyard.iscsi.pdu import LoginResponse, Pdu, encode_pdu
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole
from blockyard.iscsi.target_session import (
    AwaitWrite,
    CommandInspector,
    Event,
    ExecuteCommand,
    ResetRequested,
    SessionLimits,
    TargetConnection,
)
from blockyard.iscsi.text import TextPairs
from blockyard.scsi import LogicalUnit, LuIdentity, MemoryReservationStore, StaticAlua
from blockyard.testing.memdev import MemoryBlockDevice

TARGET = "iqn.2026-11.io.blockyard:vol1"
INITIATOR = "iqn.2024-01.org.example:host1"
BLOCKS = 4096


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakePortal:
    lu: LogicalUnit
    targets: dict[str, TargetConfig] = field(default_factory=dict)
    tsihs: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def lookup(self, target_name: str) -> TargetConfig | None:
        return self.targets.get(target_name)

    def allocate_tsih(self) -> int:
        return next(self.tsihs)

    def inspector(self, target_name: str) -> CommandInspector | None:
        return self.lu if target_name in self.targets else None

    def send_targets(
        self, value: str, *, initiator_name: str, session_target: str | None
    ) -> TextPairs:
        found = [DiscoveryTarget(n, (Portal("192.0.2.1", 3260),)) for n in self.targets]
        return send_targets_pairs(value, found, session_target=session_target)


def make_lu(blocks: int = BLOCKS) -> LogicalUnit:
    return LogicalUnit(
        MemoryBlockDevice(blocks),
        LuIdentity(uuid.UUID("12345678-1234-5678-1234-567812345678")),
        StaticAlua.single(),
        MemoryReservationStore(),
        volume_name="vol1",
    )


class Initiator:
    """Drives a :class:`TargetConnection` the way an initiator would, running the SCSI work
    it emits synchronously unless ``auto_execute`` is off."""

    def __init__(
        self,
        *,
        limits: SessionLimits | None = None,
        operational: OperationalSettings | None = None,
        target_operational: OperationalSettings | None = None,
        discovery: bool = False,
        lu: LogicalUnit | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.lu = lu or make_lu()
        self.portal = FakePortal(self.lu, {TARGET: TargetConfig(TARGET, alias="vol1")})
        settings = TargetLoginSettings(operational=target_operational or OperationalSettings())
        self.conn = TargetConnection(
            self.portal, settings, limits=limits, clock=self.clock, initial_stat_sn=500
        )
        self.reader = PduReader(peer=PeerRole.TARGET, max_data_segment_length=1 << 24 - 1)
        self.events: list[Event] = []
        self._auto_execute = True
        self.held: list[ExecuteCommand] = []
        #: Fast writes done whose answers wait for their future (see finish_writes).
        self.awaiting: list[AwaitWrite] = []
        self.resets: list[ResetRequested] = []
        self.itts = itertools.count(0x10)
        self.login_settings = InitiatorLoginSettings(
            initiator_name=INITIATOR,
            isid=0x400001370000,
            target_name=None if discovery else TARGET,
            operational=operational or OperationalSettings(),
        )
        self.cmd_sn = 0
        self.exp_stat_sn = 0

    @property
    def auto_execute(self) -> bool:
        return self._auto_execute

    @auto_execute.setter
    def auto_execute(self, value: bool) -> None:
        # Holding commands needs them as events; the fast path would answer them at once.
        self._auto_execute = value
        self.conn.fast_path = value

    # -- raw I/O --

    def send_bytes(self, data: bytes) -> list[Pdu]:
        self.conn.receive_data(data)
        self._run(self.conn.next_events())
        return self.receive()

    def send(self, *pdus: Pdu) -> list[Pdu]:
        return self.send_bytes(b"".join(encode_pdu(p) for p in pdus))

    def _run(self, events: list[Event]) -> None:
        for event in events:
            self.events.append(event)
            if isinstance(event, ExecuteCommand):
                if self._auto_execute:
                    result = self.lu.execute(event.nexus, event.cdb, event.data_out)
                    self._run(self.conn.command_done(event.task_id, result))
                else:
                    self.held.append(event)
            elif isinstance(event, AwaitWrite):
                self.awaiting.append(event)
            elif isinstance(event, ResetRequested):
                self.resets.append(event)
                self.lu.reset(event.kind)

    def finish_writes(self) -> list[Pdu]:
        """Answer the awaited fast writes whose futures are done, as the server does."""
        waiting: list[AwaitWrite] = []
        for event in self.awaiting:
            if not event.pending.future.done():
                waiting.append(event)
                continue
            result = self.lu.fast_write_outcome(event.opcode, event.lba, event.pending)
            for task_id in event.task_ids:
                self._run(self.conn.command_done(task_id, result))
        self.awaiting = waiting
        return self.receive()

    def finish_held(self) -> list[Pdu]:
        held, self.held = self.held, []
        for event in held:
            result = self.lu.execute(event.nexus, event.cdb, event.data_out)
            self._run(self.conn.command_done(event.task_id, result))
        return self.receive()

    def tick(self) -> list[Pdu]:
        self._run(self.conn.tick())
        return self.receive()

    def receive(self) -> list[Pdu]:
        for buf in self.conn.data_to_send():
            self.reader.receive_data(bytes(buf))
        out: list[Pdu] = []
        while True:
            pdu = self.reader.next_pdu()
            if pdu is NEED_DATA:
                return out
            out.append(pdu)

    # -- login --

    def login(self) -> None:
        login = InitiatorLogin(self.login_settings, itt=1)
        request = login.start()
        while request is not None:
            responses = self.send(request)
            assert len(responses) == 1, responses
            response = responses[0]
            assert isinstance(response, LoginResponse)
            request = login.receive(response)
        result = login.result
        assert result is not None
        self.params = result.params
        self.cmd_sn = result.cmd_sn
        self.exp_stat_sn = result.exp_stat_sn
        self.reader.configure(
            header_digest=result.params.header_digest, data_digest=result.params.data_digest
        )

    def next_cmd_sn(self) -> int:
        sn = self.cmd_sn
        self.cmd_sn = (sn + 1) & 0xFFFFFFFF
        return sn


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0) + bytes(6)


def write10(lba: int, blocks: int, fua: bool = False) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0x08 if fua else 0, lba, 0, blocks, 0) + bytes(6)


def sync_cache10() -> bytes:
    return bytes([0x35]) + bytes(15)


def tur() -> bytes:
    return bytes(16)


def pattern(length: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(length))
