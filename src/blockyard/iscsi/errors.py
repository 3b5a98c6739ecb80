"""Error types of the iSCSI protocol core.

Two families, split by whose fault the error is (the h11 model):

- :class:`LocalProtocolError`: our side asked for something the protocol forbids (encoding a field
  out of range, driving a state machine out of order). A bug or a bad configuration here; nothing
  is sent to the peer because of it.
- :class:`RemoteProtocolError`: the peer sent something the protocol forbids. Each instance says
  what to answer: a Reject reason code with the offending header (RFC 7143 §11.17), or a Login
  Response status (RFC 7143 §11.13.5), and whether the connection can go on (``fatal``).

Configuration mistakes (a CHAP secret too short) are :class:`IscsiConfigError`, which is also an
``InvalidArgumentError`` so management APIs map it to "invalid argument" without special cases.
"""

from __future__ import annotations

from enum import IntEnum

from blockyard.errors import BlockyardError, InvalidArgumentError


class RejectReason(IntEnum):
    """Reject PDU reason codes, RFC 7143 §11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECTED = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class LoginStatus(IntEnum):
    """Login Response Status-Class << 8 | Status-Detail, RFC 7143 §11.13.5."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def status_class(self) -> int:
        return self.value >> 8

    @property
    def status_detail(self) -> int:
        return self.value & 0xFF


class IscsiError(BlockyardError):
    """Base of every iSCSI protocol error."""


class IscsiConfigError(IscsiError, InvalidArgumentError):
    """An iSCSI setting (name, CHAP credential, limit) can never work as configured."""


class LocalProtocolError(IscsiError):
    """Our side broke the protocol; the message names the field or the call that was wrong."""


class RemoteProtocolError(IscsiError):
    """The peer broke the protocol.

    ``reject_reason`` is the Reject reason to answer with (None when a Reject is not the right
    answer, e.g. during login or when framing is lost), ``header`` the offending PDU's 48-byte
    BHS for the Reject data segment, ``login_status`` the status to answer during login, and
    ``fatal`` whether the connection must be closed because the byte stream cannot be trusted
    any further.
    """

    def __init__(
        self,
        message: str,
        *,
        reject_reason: RejectReason | None = None,
        header: bytes = b"",
        login_status: LoginStatus | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.reject_reason = reject_reason
        self.header = header
        self.login_status = login_status
        self.fatal = fatal


class PduFormatError(RemoteProtocolError):
    """A PDU is malformed: bad field value, bad AHS, a data segment where none may be."""


class UnsupportedOpcodeError(RemoteProtocolError):
    """A PDU carries an opcode we do not implement or that the peer's role may not send."""


class HeaderDigestError(RemoteProtocolError):
    """The header digest does not match; PDU boundaries can no longer be trusted (fatal)."""


class DataDigestError(RemoteProtocolError):
    """The data digest does not match; the PDU is discarded and answered with a Reject."""


class PduTooLargeError(RemoteProtocolError):
    """A declared length is over the negotiated bound; refused before buffering (fatal)."""


class TextFormatError(RemoteProtocolError):
    """A key=value text segment is malformed or over a length bound (RFC 7143 §6.1)."""


class NegotiationError(RemoteProtocolError):
    """A negotiation answer or offer breaks RFC 7143 §6 / §13 rules."""


class LoginFailedError(RemoteProtocolError):
    """Login cannot go on; ``login_status`` is the status the target answers with."""


class AuthenticationError(LoginFailedError):
    """CHAP failed: wrong response, wrong name, reflection, or a broken exchange."""


class LoginRejectedError(RemoteProtocolError):
    """Initiator side: the target answered a Login Request with a non-zero status."""
