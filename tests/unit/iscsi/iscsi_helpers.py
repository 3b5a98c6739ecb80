"""Shared helpers for the iSCSI protocol tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.login import (
    InitiatorLogin,
    InitiatorLoginSettings,
    TargetConfig,
    TargetLogin,
    TargetLoginSettings,
)
from blockyard.iscsi.pdu import LoginRequest, LoginResponse, encode_pdu
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole

TARGET_IQN = "iqn.2024-01.io.blockyard:vol1"
INITIATOR_IQN = "iqn.1994-05.com.redhat:client1"
INITIATOR_CHAP = ChapCredentials("client1", b"initiator-secret-123")
TARGET_CHAP = ChapCredentials("target1", b"target-secret-4567")


@dataclass
class Directory:
    targets: dict[str, TargetConfig] = field(default_factory=dict)

    def lookup(self, target_name: str) -> TargetConfig | None:
        return self.targets.get(target_name)


def make_target_login(
    target: TargetConfig | None = None, settings: TargetLoginSettings | None = None
) -> TargetLogin:
    config = target if target is not None else TargetConfig(TARGET_IQN, alias="vol1")
    tsihs = itertools.count(1)
    return TargetLogin(
        Directory({config.name: config}),
        settings or TargetLoginSettings(),
        allocate_tsih=lambda: next(tsihs),
        initial_stat_sn=100,
    )


def wire(pdu: LoginRequest | LoginResponse, peer: PeerRole) -> LoginRequest | LoginResponse:
    """Send a PDU through the codec, as it would travel."""
    reader = PduReader(peer=peer)
    reader.receive_data(encode_pdu(pdu))
    decoded = reader.next_pdu()
    assert decoded is not NEED_DATA
    assert isinstance(decoded, LoginRequest | LoginResponse)
    return decoded


def run_login(initiator: InitiatorLogin, target: TargetLogin) -> list[LoginResponse]:
    """Drive both sides until one stops; return every response the target sent."""
    responses: list[LoginResponse] = []
    request: LoginRequest | None = initiator.start()
    while request is not None:
        response = target.receive(wire(request, PeerRole.INITIATOR))
        responses.append(response)
        decoded = wire(response, PeerRole.TARGET)
        request = initiator.receive(decoded)
    return responses


def initiator_settings(**overrides: object) -> InitiatorLoginSettings:
    values: dict[str, object] = {
        "initiator_name": INITIATOR_IQN,
        "isid": 0x800012345678,
        "target_name": TARGET_IQN,
    }
    values.update(overrides)
    return InitiatorLoginSettings(**values)  # type: ignore[arg-type]


IDENTITY_TEXT = (
    f"InitiatorName={INITIATOR_IQN}\x00TargetName={TARGET_IQN}\x00AuthMethod=None\x00".encode()
)
