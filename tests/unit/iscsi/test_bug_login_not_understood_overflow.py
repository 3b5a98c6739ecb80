"""Regression: a Login Request carrying about 6 KiB of keys the target does not know made the
target's answer (one ``key=NotUnderstood`` per key) longer than the 8,192 bytes a login PDU may
carry; ``LocalProtocolError: login response text ... too long`` escaped the state machine and
the server's ``data_received``, so the initiator got no Login Response at all.

Now the target answers with status class "initiator error" (0x0200, RFC 7143 §11.13.5) and the
login ends as FAILED, like every other peer mistake.
"""

from __future__ import annotations

from iscsi_helpers import INITIATOR_IQN, TARGET_IQN, make_target_login, wire

from blockyard.iscsi.errors import LoginStatus
from blockyard.iscsi.login import LOGIN_MAX_DATA_SEGMENT_LENGTH, LoginState
from blockyard.iscsi.pdu import LoginRequest, LoginResponse
from blockyard.iscsi.reader import PeerRole
from blockyard.iscsi.text import encode_text, parse_text

IDENTITY = [
    ("InitiatorName", INITIATOR_IQN),
    ("TargetName", TARGET_IQN),
    ("AuthMethod", "None"),
]


def unknown_keys(count: int) -> list[tuple[str, str]]:
    """Private-extension keys (RFC 7143 §6.1 "X-") that nobody understands."""
    return [(f"X-k{i:04d}", "v") for i in range(count)]


def login_request(pairs: list[tuple[str, str]], **fields: object) -> LoginRequest:
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


def test_six_kib_of_unknown_keys_gets_an_initiator_error_response() -> None:
    pairs = IDENTITY + unknown_keys(640)
    request = login_request(pairs)
    assert 6000 <= len(request.data) <= LOGIN_MAX_DATA_SEGMENT_LENGTH  # fits in a login PDU
    target = make_target_login()
    response = target.receive(wire(request, PeerRole.INITIATOR))
    assert isinstance(response, LoginResponse)
    assert response.status == LoginStatus.INITIATOR_ERROR == 0x0200
    assert not response.transit and response.data == b""
    assert target.state is LoginState.FAILED
    assert target.failure is not None
    assert "8192" in str(target.failure)
    # The response itself travels: it decodes on the initiator's side.
    decoded = wire(response, PeerRole.TARGET)
    assert isinstance(decoded, LoginResponse) and decoded.status == 0x0200


def test_unknown_keys_in_the_operational_stage_too() -> None:
    target = make_target_login()
    first = target.receive(wire(login_request(IDENTITY), PeerRole.INITIATOR))
    assert first.status == 0 and first.transit
    second = login_request(unknown_keys(640), csg=1, nsg=3, exp_stat_sn=first.stat_sn + 1)
    response = target.receive(wire(second, PeerRole.INITIATOR))
    assert response.status == LoginStatus.INITIATOR_ERROR
    assert target.state is LoginState.FAILED and target.result is None


def test_unknown_keys_that_fit_are_still_answered_not_understood() -> None:
    target = make_target_login()
    response = target.receive(wire(login_request(IDENTITY + unknown_keys(20)), PeerRole.INITIATOR))
    assert response.status == 0
    answers = dict(parse_text(response.data))
    assert answers["X-k0000"] == "NotUnderstood" and answers["X-k0019"] == "NotUnderstood"


def test_a_continued_request_of_unknown_keys_over_the_limit_fails_cleanly() -> None:
    """C-bit continuation lets the text grow to 64 KiB; the answer must still fit."""
    target = make_target_login()
    text = encode_text(IDENTITY + unknown_keys(1500))
    middle = len(text) // 2
    head = login_request([], transit=False, nsg=0, cont=True, data=text[:middle])
    empty = target.receive(wire(head, PeerRole.INITIATOR))
    assert empty.status == 0 and empty.data == b""
    tail = login_request([], data=text[middle:])
    response = target.receive(wire(tail, PeerRole.INITIATOR))
    assert response.status == LoginStatus.INITIATOR_ERROR
    assert target.state is LoginState.FAILED
