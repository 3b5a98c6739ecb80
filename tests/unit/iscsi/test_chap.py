"""CHAP (RFC 1994 / RFC 7143 §12.1.3) against independently computed MD5 vectors."""

from __future__ import annotations

import base64
import hashlib

import pytest

from blockyard.iscsi.chap import (
    ChapAuthenticator,
    ChapCredentials,
    ChapResponder,
    chap_response,
    decode_binary,
    encode_binary,
)
from blockyard.iscsi.errors import AuthenticationError, IscsiConfigError, LoginStatus

INITIATOR = ChapCredentials("iqn.1994-05.com.redhat:client1", b"0123456789ab")
TARGET = ChapCredentials("target", b"target-secret-xyz")


def test_known_md5_vector() -> None:
    challenge = bytes(range(16))
    expected = hashlib.md5(b"\x07" + b"0123456789ab" + challenge).hexdigest()
    assert chap_response(7, b"0123456789ab", challenge).hex() == expected
    # A fixed vector, computed once with hashlib, guards against argument-order slips.
    assert chap_response(1, b"secretsecret", b"\x00" * 16).hex() == (
        hashlib.md5(b"\x01secretsecret" + b"\x00" * 16).hexdigest()
    )


def test_binary_encodings() -> None:
    raw = bytes(range(20))
    assert decode_binary(encode_binary(raw)) == raw
    assert decode_binary("0X" + raw.hex().upper()) == raw
    assert decode_binary("0b" + base64.b64encode(raw).decode()) == raw
    assert decode_binary("0x123") == bytes.fromhex("0123")
    for bad in ("123", "0x", "0xzz", "0x 12", "0b!!!", "0c00"):
        with pytest.raises(AuthenticationError):
            decode_binary(bad)


def test_secret_length_enforced_on_configuration() -> None:
    with pytest.raises(IscsiConfigError, match="at least 12 bytes"):
        ChapCredentials("user", b"short")
    with pytest.raises(IscsiConfigError):
        ChapAuthenticator(INITIATOR, ChapCredentials("t", INITIATOR.secret))
    assert "0123456789ab" not in repr(INITIATOR)


def test_one_way_exchange() -> None:
    auth = ChapAuthenticator(INITIATOR)
    challenge = dict(auth.challenge("7,5"))
    assert challenge["CHAP_A"] == "5"
    identifier, c = int(challenge["CHAP_I"]), decode_binary(challenge["CHAP_C"])
    assert len(c) >= 16
    response = hashlib.md5(bytes([identifier]) + INITIATOR.secret + c).digest()
    # base64 form of the response is accepted too
    keys = {"CHAP_N": INITIATOR.name, "CHAP_R": "0b" + base64.b64encode(response).decode()}
    assert auth.verify(keys) == []


def test_wrong_password_and_name_fail() -> None:
    auth = ChapAuthenticator(INITIATOR)
    challenge = dict(auth.challenge("5"))
    identifier, c = int(challenge["CHAP_I"]), decode_binary(challenge["CHAP_C"])
    wrong = hashlib.md5(bytes([identifier]) + b"wrong-secret" + c).digest()
    with pytest.raises(AuthenticationError) as info:
        auth.verify({"CHAP_N": INITIATOR.name, "CHAP_R": encode_binary(wrong)})
    assert info.value.login_status == LoginStatus.AUTHENTICATION_FAILURE
    right = chap_response(identifier, INITIATOR.secret, c)
    with pytest.raises(AuthenticationError):
        auth.verify({"CHAP_N": "someone-else", "CHAP_R": encode_binary(right)})


def test_md5_required() -> None:
    with pytest.raises(AuthenticationError):
        ChapAuthenticator(INITIATOR).challenge("6,7")


def test_mutual_exchange_between_both_sides() -> None:
    auth = ChapAuthenticator(INITIATOR, TARGET)
    responder = ChapResponder(INITIATOR, TARGET)
    reply = dict(responder.respond(dict(auth.challenge("5"))))
    proof = dict(auth.verify(reply))
    assert proof["CHAP_N"] == "target"
    expected = hashlib.md5(
        bytes([int(reply["CHAP_I"])]) + TARGET.secret + decode_binary(reply["CHAP_C"])
    ).digest()
    assert decode_binary(proof["CHAP_R"]) == expected
    responder.verify_target(proof)
    with pytest.raises(AuthenticationError):
        responder.verify_target({"CHAP_N": "target", "CHAP_R": encode_binary(bytes(16))})


def test_reflection_rejected() -> None:
    auth = ChapAuthenticator(INITIATOR, TARGET)
    challenge = dict(auth.challenge("5"))
    identifier, c = int(challenge["CHAP_I"]), decode_binary(challenge["CHAP_C"])
    keys = {
        "CHAP_N": INITIATOR.name,
        "CHAP_R": encode_binary(chap_response(identifier, INITIATOR.secret, c)),
        "CHAP_I": str(identifier),
        "CHAP_C": challenge["CHAP_C"],
    }
    with pytest.raises(AuthenticationError, match="reflection"):
        auth.verify(keys)


def test_mutual_refused_without_target_credentials_and_short_challenge() -> None:
    for target, challenge in ((None, bytes(range(16))), (TARGET, b"short")):
        auth = ChapAuthenticator(INITIATOR, target)
        ch = dict(auth.challenge("5"))
        identifier, c = int(ch["CHAP_I"]), decode_binary(ch["CHAP_C"])
        keys = {
            "CHAP_N": INITIATOR.name,
            "CHAP_R": encode_binary(chap_response(identifier, INITIATOR.secret, c)),
            "CHAP_I": "9",
            "CHAP_C": encode_binary(challenge),
        }
        with pytest.raises(AuthenticationError):
            auth.verify(keys)
