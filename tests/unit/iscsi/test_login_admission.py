"""TargetLogin's admit_session hook: asked once, after authentication, right before the final
response; a refusal is answered with its status and allocates no TSIH."""

from __future__ import annotations

import itertools

from iscsi_helpers import (
    INITIATOR_CHAP,
    TARGET_IQN,
    Directory,
    initiator_settings,
    wire,
)

from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.errors import LoginFailedError, LoginRejectedError, LoginStatus
from blockyard.iscsi.login import (
    InitiatorLogin,
    LoginState,
    TargetConfig,
    TargetLogin,
    TargetLoginSettings,
)
from blockyard.iscsi.pdu import LoginRequest
from blockyard.iscsi.reader import PeerRole


class Admission:
    def __init__(self, refusal: LoginFailedError | None = None) -> None:
        self.refusal = refusal
        self.asked: list[tuple[str, str | None]] = []

    def __call__(self, session_type: str, target: TargetConfig | None) -> LoginFailedError | None:
        self.asked.append((session_type, None if target is None else target.name))
        return self.refusal


def drive(initiator: InitiatorLogin, target: TargetLogin) -> LoginRejectedError | None:
    request: LoginRequest | None = initiator.start()
    while request is not None:
        response = target.receive(wire(request, PeerRole.INITIATOR))
        try:
            request = initiator.receive(wire(response, PeerRole.TARGET))
        except LoginRejectedError as exc:
            return exc
    return None


def target_login(config: TargetConfig, admission: Admission, tsihs: list[int]) -> TargetLogin:
    counter = itertools.count(1)

    def allocate() -> int:
        tsih = next(counter)
        tsihs.append(tsih)
        return tsih

    return TargetLogin(
        Directory({config.name: config}),
        TargetLoginSettings(),
        allocate_tsih=allocate,
        admit_session=admission,
        initial_stat_sn=100,
    )


def test_an_admitted_login_is_asked_once_with_its_target() -> None:
    admission, tsihs = Admission(), []
    target = target_login(TargetConfig(TARGET_IQN), admission, tsihs)
    assert drive(InitiatorLogin(initiator_settings()), target) is None
    assert target.state is LoginState.COMPLETE
    assert admission.asked == [("Normal", TARGET_IQN)] and tsihs == [1]


def test_a_refused_login_gets_the_refusal_status_and_no_tsih() -> None:
    refusal = LoginFailedError("slots taken", login_status=LoginStatus.OUT_OF_RESOURCES)
    admission, tsihs = Admission(refusal), []
    target = target_login(TargetConfig(TARGET_IQN), admission, tsihs)
    rejected = drive(InitiatorLogin(initiator_settings()), target)
    assert rejected is not None and rejected.login_status is LoginStatus.OUT_OF_RESOURCES
    assert target.state is LoginState.FAILED and target.result is None
    assert tsihs == [] and target.failure is refusal


def test_a_login_that_fails_authentication_is_never_asked() -> None:
    admission, tsihs = Admission(), []
    config = TargetConfig(TARGET_IQN, chap=INITIATOR_CHAP)
    wrong = initiator_settings(chap=ChapCredentials("client1", b"not-the-secret-1"))
    target = target_login(config, admission, tsihs)
    rejected = drive(InitiatorLogin(wrong), target)
    assert rejected is not None and rejected.login_status is LoginStatus.AUTHENTICATION_FAILURE
    assert admission.asked == [] and tsihs == []


def test_discovery_sessions_are_asked_without_a_target() -> None:
    admission, tsihs = Admission(), []
    target = target_login(TargetConfig(TARGET_IQN), admission, tsihs)
    assert drive(InitiatorLogin(initiator_settings(target_name=None)), target) is None
    assert admission.asked == [("Discovery", None)]
