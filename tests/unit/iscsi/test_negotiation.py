"""Operational key negotiation tables (RFC 7143 §6.2, §13)."""

from __future__ import annotations

import pytest

from blockyard.iscsi.errors import IscsiConfigError, NegotiationError
from blockyard.iscsi.negotiation import (
    Negotiator,
    OperationalSettings,
    Role,
    answer_is_valid,
    parse_number,
    respond_value,
)


@pytest.mark.parametrize(
    ("key", "offered", "ours", "answer"),
    [
        ("HeaderDigest", "CRC32C,None", "None", "None"),
        ("HeaderDigest", "CRC32C,None", "CRC32C,None", "CRC32C"),
        ("DataDigest", "None,CRC32C", "CRC32C,None", "None"),  # proposer's order wins
        ("HeaderDigest", "CRC32C", "None", "Reject"),
        ("HeaderDigest", "MD5,CRC32C", "CRC32C", "CRC32C"),  # unknown values skipped
        ("InitialR2T", "No", "No", "No"),  # OR
        ("InitialR2T", "No", "Yes", "Yes"),
        ("DataPDUInOrder", "Yes", "No", "Yes"),
        ("ImmediateData", "Yes", "No", "No"),  # AND
        ("ImmediateData", "Yes", "Yes", "Yes"),
        ("MaxBurstLength", "1048576", "262144", "262144"),  # min
        ("FirstBurstLength", "8192", "65536", "8192"),
        ("MaxOutstandingR2T", "16", "1", "1"),
        ("MaxConnections", "8", "1", "1"),
        ("ErrorRecoveryLevel", "2", "0", "0"),
        ("DefaultTime2Wait", "0", "2", "2"),  # max
        ("DefaultTime2Wait", "10", "2", "10"),
        ("DefaultTime2Retain", "0", "20", "0"),  # min
        ("MaxBurstLength", "0x100000", "262144", "262144"),  # hex numbers
        ("MaxBurstLength", "100", "262144", "Reject"),  # below 512
        ("DefaultTime2Wait", "3601", "2", "Reject"),
        ("InitialR2T", "maybe", "Yes", "Reject"),
        ("MaxConnections", "-1", "1", "Reject"),
    ],
)
def test_respond_value(key: str, offered: str, ours: str, answer: str) -> None:
    assert respond_value(key, offered, ours) == answer


@pytest.mark.parametrize(
    ("key", "offered", "answered", "valid"),
    [
        ("ImmediateData", "No", "Yes", False),
        ("ImmediateData", "Yes", "No", True),
        ("InitialR2T", "Yes", "No", False),
        ("MaxBurstLength", "262144", "524288", False),
        ("MaxBurstLength", "262144", "65536", True),
        ("DefaultTime2Wait", "2", "1", False),
        ("HeaderDigest", "CRC32C,None", "None", True),
        ("HeaderDigest", "None", "CRC32C", False),
    ],
)
def test_answer_checks(key: str, offered: str, answered: str, valid: bool) -> None:
    assert answer_is_valid(key, offered, answered) is valid


def test_parse_number() -> None:
    assert parse_number("0x10") == 16
    assert parse_number("512") == 512
    assert parse_number("") is None
    assert parse_number("12a") is None
    assert parse_number("٣") is None  # non-ASCII digits are not iSCSI numbers


def test_target_negotiation_end_to_end() -> None:
    target = Negotiator(
        OperationalSettings(header_digests=("CRC32C", "None"), max_burst_length=131072),
        Role.TARGET,
    )
    answers = dict(
        target.receive(
            [
                ("HeaderDigest", "CRC32C,None"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "1048576"),
                ("FirstBurstLength", "262144"),
                ("X-com.example.Foo", "1"),
                ("OFMarker", "No"),
                ("IFMarkInt", "2048~8192"),
            ]
        )
    )
    assert answers == {
        "HeaderDigest": "CRC32C",
        "MaxBurstLength": "131072",
        "FirstBurstLength": "65536",  # our 65536, already under the negotiated burst
        "X-com.example.Foo": "NotUnderstood",
        "OFMarker": "No",
        "IFMarkInt": "Reject",
    }
    assert target.offers() == [("MaxRecvDataSegmentLength", "262144")]
    result = target.result()
    assert result.header_digest and not result.data_digest
    assert result.max_xmit_data_segment_length == 65536
    assert result.max_recv_data_segment_length == 262144
    assert result.max_burst_length == 131072


def test_first_burst_irrelevant_when_no_unsolicited_data() -> None:
    target = Negotiator(OperationalSettings(immediate_data=False), Role.TARGET)
    answers = dict(
        target.receive(
            [("FirstBurstLength", "8192"), ("InitialR2T", "Yes"), ("ImmediateData", "Yes")]
        )
    )
    assert answers["FirstBurstLength"] == "Irrelevant"


def test_discovery_irrelevant_keys() -> None:
    target = Negotiator(OperationalSettings(), Role.TARGET, session_type="Discovery")
    answers = dict(target.receive([("MaxBurstLength", "512"), ("HeaderDigest", "None")]))
    assert answers == {"MaxBurstLength": "Irrelevant", "HeaderDigest": "None"}


def test_renegotiation_is_an_error() -> None:
    target = Negotiator(OperationalSettings(), Role.TARGET)
    target.receive([("MaxBurstLength", "512")])
    with pytest.raises(NegotiationError):
        target.receive([("MaxBurstLength", "1024")])
    with pytest.raises(NegotiationError):
        target.receive([("ImmediateData", "Reject")])


def test_initiator_checks_answers() -> None:
    initiator = Negotiator(OperationalSettings(immediate_data=False), Role.INITIATOR)
    offered = dict(initiator.offers())
    assert offered["ImmediateData"] == "No"
    with pytest.raises(NegotiationError):
        initiator.receive([("ImmediateData", "Yes")])


def test_initiator_defaults_for_omitted_optional_answers() -> None:
    initiator = Negotiator(OperationalSettings(immediate_data=False), Role.INITIATOR)
    initiator.offers()
    initiator.receive([("MaxRecvDataSegmentLength", "16384")])
    result = initiator.result()
    assert result.immediate_data is False  # AND with No needs no answer (RFC 7143 §6.2.2)
    assert result.initial_r2t is True
    assert result.max_xmit_data_segment_length == 16384


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_burst_length": 100},
        {"first_burst_length": 1 << 20, "max_burst_length": 1 << 19},
        {"header_digests": ("MD5",)},
        {"error_recovery_level": 1},
        {"default_time2wait": 4000},
    ],
)
def test_settings_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(IscsiConfigError):
        OperationalSettings(**kwargs)  # type: ignore[arg-type]
