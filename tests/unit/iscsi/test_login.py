"""Login state machines: target against initiator, and target against hand-built requests."""

from __future__ import annotations

import pytest
from iscsi_helpers import (
    INITIATOR_CHAP,
    INITIATOR_IQN,
    TARGET_CHAP,
    TARGET_IQN,
    Directory,
    initiator_settings,
    make_target_login,
    run_login,
)

from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.errors import (
    AuthenticationError,
    LocalProtocolError,
    LoginRejectedError,
    LoginStatus,
    RemoteProtocolError,
)
from blockyard.iscsi.login import (
    InitiatorLogin,
    LoginState,
    TargetConfig,
    TargetLogin,
    TargetLoginSettings,
)
from blockyard.iscsi.negotiation import OperationalSettings
from blockyard.iscsi.pdu import LoginRequest, LoginResponse, NopOut
from blockyard.iscsi.text import encode_text, parse_text

CHAP_TARGET = TargetConfig(TARGET_IQN, chap=INITIATOR_CHAP, mutual_chap=TARGET_CHAP)


def request(pairs: list[tuple[str, str]], **fields: object) -> LoginRequest:
    values: dict[str, object] = {
        "isid": 0x80001,
        "itt": 7,
        "transit": True,
        "csg": 0,
        "nsg": 1,
        "data": encode_text(pairs),
    }
    values.update(fields)
    return LoginRequest(**values)  # type: ignore[arg-type]


IDENTITY = [("InitiatorName", INITIATOR_IQN), ("TargetName", TARGET_IQN)]


def test_no_auth_login() -> None:
    target = make_target_login()
    initiator = InitiatorLogin(initiator_settings(), itt=7, cmd_sn=42)
    responses = run_login(initiator, target)
    assert target.state is LoginState.COMPLETE
    assert [r.stat_sn for r in responses] == [100, 101]
    assert all(r.exp_cmd_sn == 42 for r in responses)
    final = responses[-1]
    assert final.transit and final.nsg == 3 and final.tsih == 1
    assert all(r.tsih == 0 for r in responses[:-1])
    assert target.result is not None and initiator.result is not None
    assert target.result.params.initiator_name == INITIATOR_IQN
    assert target.result.params.target_portal_group_tag == 1
    assert initiator.result.tsih == 1 and initiator.result.exp_stat_sn == 102
    assert initiator.result.params.target_alias == "vol1"
    with pytest.raises(LocalProtocolError):
        target.receive(request([]))


def test_chap_login() -> None:
    target = make_target_login(TargetConfig(TARGET_IQN, chap=INITIATOR_CHAP))
    initiator = InitiatorLogin(initiator_settings(chap=INITIATOR_CHAP))
    run_login(initiator, target)
    assert target.state is LoginState.COMPLETE and initiator.result is not None


def test_mutual_chap_login() -> None:
    target = make_target_login(CHAP_TARGET)
    initiator = InitiatorLogin(initiator_settings(chap=INITIATOR_CHAP, target_chap=TARGET_CHAP))
    responses = run_login(initiator, target)
    assert target.state is LoginState.COMPLETE and initiator.result is not None
    proof = dict(parse_text(bytes(responses[2].data)))
    assert proof["CHAP_N"] == TARGET_CHAP.name and responses[2].transit


def test_digests_and_lengths_negotiated() -> None:
    operational = OperationalSettings(
        header_digests=("CRC32C", "None"),
        data_digests=("CRC32C",),
        max_recv_data_segment_length=65536,
    )
    target = make_target_login(settings=TargetLoginSettings(operational=operational))
    initiator = InitiatorLogin(
        initiator_settings(
            operational=OperationalSettings(
                header_digests=("CRC32C", "None"), data_digests=("CRC32C", "None")
            )
        )
    )
    run_login(initiator, target)
    assert target.result is not None and initiator.result is not None
    t, i = target.result.params, initiator.result.params
    assert t.header_digest and t.data_digest and i.header_digest and i.data_digest
    assert t.max_recv_data_segment_length == 65536 == i.max_xmit_data_segment_length
    assert i.max_recv_data_segment_length == 262144 == t.max_xmit_data_segment_length


def test_wrong_password() -> None:
    target = make_target_login(TargetConfig(TARGET_IQN, chap=INITIATOR_CHAP))
    wrong = ChapCredentials(INITIATOR_CHAP.name, b"not-the-right-secret")
    with pytest.raises(LoginRejectedError) as info:
        run_login(InitiatorLogin(initiator_settings(chap=wrong)), target)
    assert info.value.login_status == LoginStatus.AUTHENTICATION_FAILURE
    assert target.state is LoginState.FAILED


def test_target_fails_mutual_chap() -> None:
    target = make_target_login(
        TargetConfig(TARGET_IQN, chap=INITIATOR_CHAP, mutual_chap=TARGET_CHAP)
    )
    expected = ChapCredentials(TARGET_CHAP.name, b"what-we-expect-123")
    initiator = InitiatorLogin(initiator_settings(chap=INITIATOR_CHAP, target_chap=expected))
    with pytest.raises(AuthenticationError):
        run_login(initiator, target)


def test_auth_required_but_initiator_offers_none() -> None:
    target = make_target_login(TargetConfig(TARGET_IQN, chap=INITIATOR_CHAP))
    with pytest.raises(LoginRejectedError) as info:
        run_login(InitiatorLogin(initiator_settings()), target)
    assert info.value.login_status == LoginStatus.AUTHENTICATION_FAILURE


def test_auth_required_but_security_stage_skipped() -> None:
    target = make_target_login(TargetConfig(TARGET_IQN, chap=INITIATOR_CHAP))
    response = target.receive(request(IDENTITY, csg=1, nsg=3))
    assert response.status == LoginStatus.AUTHENTICATION_FAILURE


def test_unknown_target() -> None:
    with pytest.raises(LoginRejectedError) as info:
        run_login(
            InitiatorLogin(initiator_settings(target_name="iqn.2024-01.io.blockyard:nope")),
            make_target_login(),
        )
    assert info.value.login_status == LoginStatus.NOT_FOUND


def test_acl_deny() -> None:
    target = make_target_login(
        TargetConfig(TARGET_IQN, allowed_initiators=frozenset({"iqn.2024-01.io.other:x"}))
    )
    with pytest.raises(LoginRejectedError) as info:
        run_login(InitiatorLogin(initiator_settings()), target)
    assert info.value.login_status == LoginStatus.AUTHORIZATION_FAILURE


def test_discovery_session() -> None:
    target = make_target_login()
    initiator = InitiatorLogin(initiator_settings(target_name=None))
    responses = run_login(initiator, target)
    assert target.result is not None and target.result.target is None
    assert target.result.params.session_type == "Discovery"
    assert not any(k == "TargetPortalGroupTag" for k, _ in parse_text(bytes(responses[0].data)))
    sent = dict(parse_text(bytes(responses[-1].data)))
    assert "MaxBurstLength" not in sent  # irrelevant keys are not proposed in discovery


def test_discovery_chap() -> None:
    settings = TargetLoginSettings(discovery_chap=INITIATOR_CHAP)
    with pytest.raises(LoginRejectedError):
        run_login(
            InitiatorLogin(initiator_settings(target_name=None)),
            make_target_login(settings=settings),
        )
    target = make_target_login(settings=settings)
    run_login(InitiatorLogin(initiator_settings(target_name=None, chap=INITIATOR_CHAP)), target)
    assert target.state is LoginState.COMPLETE


@pytest.mark.parametrize(
    ("fields", "pairs", "status"),
    [
        ({"version_min": 1, "version_max": 2}, IDENTITY, LoginStatus.UNSUPPORTED_VERSION),
        ({}, [("TargetName", TARGET_IQN)], LoginStatus.MISSING_PARAMETER),
        ({}, [("InitiatorName", INITIATOR_IQN)], LoginStatus.MISSING_PARAMETER),
        ({}, [*IDENTITY, ("SessionType", "Bogus")], LoginStatus.SESSION_TYPE_NOT_SUPPORTED),
        ({"tsih": 5}, IDENTITY, LoginStatus.SESSION_DOES_NOT_EXIST),
        ({"nsg": 0}, IDENTITY, LoginStatus.INITIATOR_ERROR),  # transit to an earlier stage
        ({"nsg": 2}, IDENTITY, LoginStatus.INITIATOR_ERROR),  # reserved stage
        ({"csg": 3, "nsg": 3}, IDENTITY, LoginStatus.INITIATOR_ERROR),  # starts in FFP
        ({"cont": True}, IDENTITY, LoginStatus.INITIATOR_ERROR),  # T and C together
        ({}, [*IDENTITY, ("InitiatorName", "x")], LoginStatus.INITIATOR_ERROR),  # duplicate
        ({}, [("InitiatorName", "not a name"), IDENTITY[1]], LoginStatus.INITIATOR_ERROR),
    ],
)
def test_bad_first_requests(
    fields: dict[str, object], pairs: list[tuple[str, str]], status: LoginStatus
) -> None:
    target = make_target_login()
    response = target.receive(request(pairs, **fields))
    assert response.status == status
    assert not response.transit and response.tsih == 0
    assert target.state is LoginState.FAILED
    assert target.failure is not None and target.failure.login_status == status


def test_bad_stage_transition_mid_login() -> None:
    target = make_target_login()
    first = target.receive(request([*IDENTITY, ("AuthMethod", "None")], transit=False))
    assert first.status == 0 and not first.transit
    # Still in SecurityNegotiation, but the request claims to be in the operational stage.
    response = target.receive(request([], csg=1, nsg=3))
    assert response.status == LoginStatus.INITIATOR_ERROR


def test_changed_isid_mid_login() -> None:
    target = make_target_login()
    target.receive(request([*IDENTITY, ("AuthMethod", "None")], transit=False))
    assert target.receive(request([], isid=0x9999)).status == LoginStatus.INITIATOR_ERROR


def test_non_login_pdu_during_login() -> None:
    target = make_target_login()
    response = target.receive(NopOut())
    assert response.status == LoginStatus.INVALID_DURING_LOGIN


def test_existing_session_gets_too_many_connections() -> None:
    target = TargetLogin(
        Directory({TARGET_IQN: TargetConfig(TARGET_IQN)}),
        TargetLoginSettings(),
        allocate_tsih=lambda: 1,
        session_exists=lambda isid, tsih: tsih == 5,
    )
    assert target.receive(request(IDENTITY, tsih=5)).status == LoginStatus.TOO_MANY_CONNECTIONS


def test_continued_request_gets_empty_response() -> None:
    target = make_target_login()
    text = encode_text([*IDENTITY, ("AuthMethod", "None")])
    partial = target.receive(request([], transit=False, cont=True, data=text[:10]))
    assert partial.status == 0 and not partial.data and not partial.transit
    final = target.receive(request([], data=text[10:]))
    assert final.status == 0 and final.transit and final.nsg == 1


def test_direct_transit_to_full_feature_phase() -> None:
    target = make_target_login()
    response = target.receive(request([*IDENTITY, ("AuthMethod", "None")], nsg=3))
    assert response.transit and response.nsg == 3 and response.tsih == 1
    sent = dict(parse_text(bytes(response.data)))
    assert sent["MaxRecvDataSegmentLength"] == "262144"
    assert target.state is LoginState.COMPLETE


def test_initiator_rejects_unrequested_transit() -> None:
    initiator = InitiatorLogin(initiator_settings(chap=INITIATOR_CHAP))
    first = initiator.start()
    bogus = LoginResponse(
        itt=first.itt,
        isid=first.isid,
        transit=True,
        csg=0,
        nsg=1,
        data=encode_text([("AuthMethod", "CHAP")]),
    )
    with pytest.raises(RemoteProtocolError):
        initiator.receive(bogus)
