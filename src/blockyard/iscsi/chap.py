"""CHAP authentication for iSCSI login (RFC 1994 with RFC 7143 §12.1.3), MD5 only.

The response to identifier ``I`` and challenge ``C`` is ``MD5(I || secret || C)`` (RFC 1994
§4.1). Exchange in the SecurityNegotiation stage::

    I: CHAP_A=5                    T: CHAP_A=5 CHAP_I=<I> CHAP_C=<C>
    I: CHAP_N=<name> CHAP_R=<R>    (mutual: also CHAP_I=<I'> CHAP_C=<C'>)
                                   T: (mutual) CHAP_N=<target name> CHAP_R=<R'>

Binary values are accepted hex-encoded (``0x``) or base64-encoded (``0b``) and always sent as
hex (RFC 7143 §6.1). Comparisons of names and responses are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from blockyard.iscsi.errors import AuthenticationError, IscsiConfigError, LoginStatus
from blockyard.iscsi.text import MAX_CHAP_BINARY_LENGTH, TextPairs

CHAP_ALGORITHM_MD5 = 5  # RFC 1994 §2.1 / RFC 7143 §12.1.3: CHAP_A value for MD5
MIN_SECRET_LENGTH = 12  # RFC 7143 §12.1.3: secrets of at least 96 bits
MAX_SECRET_LENGTH = 255  # keeps a configured secret within one simple-value (RFC 7143 §6.1)
CHALLENGE_LENGTH = 16  # RFC 1994 §2.3: at least the hash length (16 bytes for MD5)
#: Shortest challenge we answer in mutual CHAP: shorter ones make response tables practical.
MIN_CHALLENGE_LENGTH = 16
MAX_CHALLENGE_LENGTH = MAX_CHAP_BINARY_LENGTH  # RFC 7143 §12.1.3: CHAP_C at most 1024 bytes
MAX_CHAP_NAME_LENGTH = 255  # RFC 7143 §6.1 simple-value bound
MD5_LENGTH = 16

_HEX_RE = re.compile(r"[0-9a-fA-F]+")
_IDENTIFIER_RE = re.compile(r"[0-9]{1,3}")

#: Keys of the CHAP exchange, all SecurityNegotiation-stage only (RFC 7143 §12.1.3).
CHAP_KEYS = frozenset({"CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})


def _fail(message: str) -> AuthenticationError:
    return AuthenticationError(message, login_status=LoginStatus.AUTHENTICATION_FAILURE)


def encode_binary(value: bytes) -> str:
    """Hex text form of a binary value (RFC 7143 §6.1 hex-constant)."""
    return "0x" + value.hex()


def decode_binary(text: str) -> bytes:
    """Decode a ``0x``-hex or ``0b``-base64 binary value (RFC 7143 §6.1).

    Raises :class:`AuthenticationError` for anything else: CHAP values are the only binary
    values exchanged during login, and a malformed one fails authentication.
    """
    prefix, body = text[:2], text[2:]
    if not body:
        raise _fail(f"empty CHAP binary value {text!r}")
    try:
        if prefix in ("0x", "0X"):
            if not _HEX_RE.fullmatch(body):
                raise _fail(f"CHAP value {text[:16]!r}... has non-hex digits")
            if len(body) % 2:
                body = "0" + body  # RFC 7143 §6.1 allows an odd digit count: leading nibble
            return bytes.fromhex(body)
        if prefix in ("0b", "0B"):
            return base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise _fail(f"malformed CHAP binary value: {exc}") from exc
    raise _fail(f"CHAP binary value {text[:16]!r}... must start with 0x or 0b")


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """MD5(identifier || secret || challenge), RFC 1994 §4.1."""
    if not 0 <= identifier <= 255:
        raise ValueError(f"CHAP identifier {identifier} is not one byte")
    return hashlib.md5(bytes((identifier,)) + secret + challenge, usedforsecurity=True).digest()


@dataclass(frozen=True, slots=True)
class ChapCredentials:
    """A CHAP name and secret. Rejects secrets under 12 bytes (RFC 7143 §12.1.3)."""

    name: str
    secret: bytes

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > MAX_CHAP_NAME_LENGTH or "\x00" in self.name:
            raise IscsiConfigError(
                f"CHAP name must be 1..{MAX_CHAP_NAME_LENGTH} bytes without NUL; "
                f"got {len(self.name.encode())} bytes"
            )
        if not MIN_SECRET_LENGTH <= len(self.secret) <= MAX_SECRET_LENGTH:
            raise IscsiConfigError(
                f"CHAP secret for {self.name!r} is {len(self.secret)} bytes; RFC 7143 §12.1.3 "
                f"asks for at least {MIN_SECRET_LENGTH} bytes (96 bits) of secret, and we allow "
                f"at most {MAX_SECRET_LENGTH}. Configure a longer random secret."
            )

    def __repr__(self) -> str:
        return f"ChapCredentials(name={self.name!r}, secret=<{len(self.secret)} bytes>)"


def check_mutual_pair(initiator: ChapCredentials, target: ChapCredentials | None) -> None:
    """Refuse the same secret in both directions: it would let a peer reflect challenges
    (RFC 7143 §12.1.3)."""
    if target is not None and hmac.compare_digest(initiator.secret, target.secret):
        raise IscsiConfigError(
            "the initiator and target CHAP secrets are identical; mutual CHAP needs two "
            "different secrets (RFC 7143 §12.1.3)"
        )


def _select_md5(offer: str) -> None:
    if str(CHAP_ALGORITHM_MD5) not in offer.split(","):
        raise _fail(f"CHAP_A={offer[:64]} does not offer MD5 (5), the only algorithm we support")


def _identifier(text: str) -> int:
    if not _IDENTIFIER_RE.fullmatch(text) or int(text) > 255:
        raise _fail(f"CHAP_I={text[:16]} is not a number in 0..255")
    return int(text)


class ChapAuthenticator:
    """Target side: challenges the initiator, verifies it, and answers a mutual challenge.

    ``initiator`` is what the initiator must prove; ``target`` are our own credentials for
    mutual CHAP (None refuses mutual CHAP). Not thread-safe; one per login.
    """

    __slots__ = ("_challenge", "_identifier", "_initiator", "_target")

    def __init__(self, initiator: ChapCredentials, target: ChapCredentials | None = None) -> None:
        check_mutual_pair(initiator, target)
        self._initiator = initiator
        self._target = target
        self._identifier: int | None = None
        self._challenge: bytes | None = None

    @property
    def challenged(self) -> bool:
        return self._challenge is not None

    def challenge(self, chap_a: str) -> TextPairs:
        """Answer ``CHAP_A`` with the algorithm, a fresh identifier and a fresh challenge."""
        _select_md5(chap_a)
        self._identifier = secrets.randbelow(256)
        self._challenge = secrets.token_bytes(CHALLENGE_LENGTH)
        return [
            ("CHAP_A", str(CHAP_ALGORITHM_MD5)),
            ("CHAP_I", str(self._identifier)),
            ("CHAP_C", encode_binary(self._challenge)),
        ]

    def verify(self, keys: Mapping[str, str]) -> TextPairs:
        """Check CHAP_N/CHAP_R; answer a mutual CHAP_I/CHAP_C. Raises on any failure."""
        if self._identifier is None or self._challenge is None:
            raise _fail("CHAP_R before a challenge was sent")
        name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or response is None:
            raise _fail("CHAP_N and CHAP_R are both required after a challenge")
        expected = chap_response(self._identifier, self._initiator.secret, self._challenge)
        name_ok = hmac.compare_digest(name.encode(), self._initiator.name.encode())
        response_ok = hmac.compare_digest(decode_binary(response), expected)
        if not (name_ok and response_ok):
            raise _fail("CHAP name or response does not match the configured credentials")
        peer_identifier, peer_challenge = keys.get("CHAP_I"), keys.get("CHAP_C")
        if peer_identifier is None and peer_challenge is None:
            return []
        if peer_identifier is None or peer_challenge is None:
            raise _fail("mutual CHAP needs both CHAP_I and CHAP_C")
        if self._target is None:
            raise _fail("the initiator asked for mutual CHAP but this target has no credentials")
        identifier = _identifier(peer_identifier)
        challenge = decode_binary(peer_challenge)
        if not MIN_CHALLENGE_LENGTH <= len(challenge) <= MAX_CHALLENGE_LENGTH:
            raise _fail(
                f"mutual CHAP challenge of {len(challenge)} bytes is outside "
                f"{MIN_CHALLENGE_LENGTH}..{MAX_CHALLENGE_LENGTH}"
            )
        if hmac.compare_digest(challenge, self._challenge):
            raise _fail("the initiator sent back our own challenge (reflection, RFC 7143 §12.1.3)")
        return [
            ("CHAP_N", self._target.name),
            ("CHAP_R", encode_binary(chap_response(identifier, self._target.secret, challenge))),
        ]


class ChapResponder:
    """Initiator side: answers the target's challenge and, for mutual CHAP, checks the target.

    ``target`` are the credentials the target must prove (None for one-way CHAP).
    """

    __slots__ = ("_challenge", "_identifier", "_own", "_target")

    def __init__(self, own: ChapCredentials, target: ChapCredentials | None = None) -> None:
        check_mutual_pair(own, target)
        self._own = own
        self._target = target
        self._identifier: int | None = None
        self._challenge: bytes | None = None

    @staticmethod
    def offer() -> TextPairs:
        return [("CHAP_A", str(CHAP_ALGORITHM_MD5))]

    def respond(self, keys: Mapping[str, str]) -> TextPairs:
        """Answer the target's CHAP_A/CHAP_I/CHAP_C."""
        chap_a, identifier, challenge = keys.get("CHAP_A"), keys.get("CHAP_I"), keys.get("CHAP_C")
        if chap_a is None or identifier is None or challenge is None:
            raise _fail("the target's challenge lacks CHAP_A, CHAP_I or CHAP_C")
        if chap_a != str(CHAP_ALGORITHM_MD5):
            raise _fail(f"the target chose CHAP_A={chap_a[:16]}, which we did not offer")
        target_challenge = decode_binary(challenge)
        if not 1 <= len(target_challenge) <= MAX_CHALLENGE_LENGTH:
            raise _fail(f"target challenge of {len(target_challenge)} bytes is out of range")
        pairs: TextPairs = [
            ("CHAP_N", self._own.name),
            (
                "CHAP_R",
                encode_binary(
                    chap_response(_identifier(identifier), self._own.secret, target_challenge)
                ),
            ),
        ]
        if self._target is not None:
            self._identifier = secrets.randbelow(256)
            while True:
                self._challenge = secrets.token_bytes(CHALLENGE_LENGTH)
                if self._challenge != target_challenge:
                    break
            pairs += [
                ("CHAP_I", str(self._identifier)),
                ("CHAP_C", encode_binary(self._challenge)),
            ]
        return pairs

    @property
    def expects_target_proof(self) -> bool:
        return self._target is not None

    def verify_target(self, keys: Mapping[str, str]) -> None:
        """Check the target's CHAP_N/CHAP_R in mutual CHAP."""
        if self._target is None:
            return
        if self._identifier is None or self._challenge is None:
            raise _fail("no mutual challenge was sent")
        name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or response is None:
            raise _fail("the target did not answer our mutual CHAP challenge")
        expected = chap_response(self._identifier, self._target.secret, self._challenge)
        name_ok = hmac.compare_digest(name.encode(), self._target.name.encode())
        if not (name_ok and hmac.compare_digest(decode_binary(response), expected)):
            raise _fail("the target failed mutual CHAP authentication")
