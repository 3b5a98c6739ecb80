"""Operational parameter negotiation, RFC 7143 §6.2 and §13.

One :class:`Negotiator` serves either role. It answers the peer's offers with the key's result
function (list, AND, OR, min, max), records the peer's declarations, checks the peer's answers
to our own offers, and finally yields an immutable :class:`NegotiatedParameters`.

Identity and security keys (InitiatorName, TargetName, SessionType, AuthMethod, CHAP_*) belong
to the login state machine; pass only the rest here. Unknown keys get ``NotUnderstood``, keys
that mean nothing for a Discovery session get ``Irrelevant``, bad values get ``Reject``, and in
each of those cases the parameter keeps its default (RFC 7143 §6.2).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from blockyard.iscsi.errors import IscsiConfigError, NegotiationError
from blockyard.iscsi.text import TextPairs

# Answer constants, RFC 7143 §6.2.
REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NOT_UNDERSTOOD = "NotUnderstood"
_SPECIAL_ANSWERS = frozenset({REJECT, IRRELEVANT, NOT_UNDERSTOOD})

YES = "Yes"
NO = "No"
DIGEST_NONE = "None"  # RFC 7143 §13.1
DIGEST_CRC32C = "CRC32C"  # RFC 7143 §13.1
SUPPORTED_DIGESTS = (DIGEST_CRC32C, DIGEST_NONE)

SESSION_TYPE_NORMAL = "Normal"  # RFC 7143 §13.21
SESSION_TYPE_DISCOVERY = "Discovery"  # RFC 7143 §13.21

MIN_DATA_LENGTH = 512  # RFC 7143 §13.12 - §13.14: lower bound of the three length keys
MAX_DATA_LENGTH = (1 << 24) - 1  # RFC 7143 §13.12 - §13.14: upper bound
MAX_TIME2WAIT = 3600  # RFC 7143 §13.15 / §13.16: DefaultTime2Wait/Retain range 0..3600
MAX_R2T_OR_CONNECTIONS = 65535  # RFC 7143 §13.2 / §13.17
MAX_ERROR_RECOVERY_LEVEL = 2  # RFC 7143 §13.20
SUPPORTED_ERROR_RECOVERY_LEVEL = 0  # this implementation recovers by dropping the session
DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH = 8192  # RFC 7143 §13.12

# RFC 7143 §13.26: the marker keys are obsolete. A responder may answer the boolean ones with
# "No" (kept for old initiators that treat Reject as failure) and must Reject the intervals.
_OBSOLETE_BOOLEAN_KEYS = frozenset({"OFMarker", "IFMarker"})
_OBSOLETE_REJECT_KEYS = frozenset({"OFMarkInt", "IFMarkInt"})

_NUMBER_RE = re.compile(r"0[xX][0-9a-fA-F]{1,16}|[0-9]{1,20}")  # RFC 7143 §6.1 numeric constants


class _Kind(Enum):
    LIST = "list"
    AND = "and"
    OR = "or"
    MIN = "min"
    MAX = "max"
    DECLARATIVE = "declarative"


@dataclass(frozen=True, slots=True)
class _KeySpec:
    kind: _Kind
    default: str
    low: int = 0
    high: int = 0
    discovery_irrelevant: bool = False


_KEYS: dict[str, _KeySpec] = {
    "HeaderDigest": _KeySpec(_Kind.LIST, DIGEST_NONE),  # RFC 7143 §13.1
    "DataDigest": _KeySpec(_Kind.LIST, DIGEST_NONE),  # RFC 7143 §13.1
    "MaxConnections": _KeySpec(_Kind.MIN, "1", 1, MAX_R2T_OR_CONNECTIONS, True),  # §13.2
    "InitialR2T": _KeySpec(_Kind.OR, YES, discovery_irrelevant=True),  # RFC 7143 §13.10
    "ImmediateData": _KeySpec(_Kind.AND, YES, discovery_irrelevant=True),  # RFC 7143 §13.11
    "MaxRecvDataSegmentLength": _KeySpec(  # RFC 7143 §13.12: declared per direction
        _Kind.DECLARATIVE,
        str(DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH),
        MIN_DATA_LENGTH,
        MAX_DATA_LENGTH,
    ),
    "MaxBurstLength": _KeySpec(  # RFC 7143 §13.13
        _Kind.MIN, "262144", MIN_DATA_LENGTH, MAX_DATA_LENGTH, True
    ),
    "FirstBurstLength": _KeySpec(  # RFC 7143 §13.14
        _Kind.MIN, "65536", MIN_DATA_LENGTH, MAX_DATA_LENGTH, True
    ),
    "DefaultTime2Wait": _KeySpec(_Kind.MAX, "2", 0, MAX_TIME2WAIT),  # RFC 7143 §13.15
    "DefaultTime2Retain": _KeySpec(_Kind.MIN, "20", 0, MAX_TIME2WAIT),  # RFC 7143 §13.16
    "MaxOutstandingR2T": _KeySpec(  # RFC 7143 §13.17
        _Kind.MIN, "1", 1, MAX_R2T_OR_CONNECTIONS, True
    ),
    "DataPDUInOrder": _KeySpec(_Kind.OR, YES, discovery_irrelevant=True),  # RFC 7143 §13.18
    "DataSequenceInOrder": _KeySpec(_Kind.OR, YES, discovery_irrelevant=True),  # §13.19
    "ErrorRecoveryLevel": _KeySpec(_Kind.MIN, "0", 0, MAX_ERROR_RECOVERY_LEVEL),  # §13.20
}

#: Keys this module negotiates.
OPERATIONAL_KEYS = frozenset(_KEYS)
#: Keys only sendable by the target; an initiator offering one gets Reject (RFC 7143 §13.7-9).
TARGET_DECLARED_KEYS = frozenset({"TargetAlias", "TargetAddress", "TargetPortalGroupTag"})
#: Keys sent by the initiator in the first Login Request (RFC 7143 §13.4 / §13.5 / §13.21).
INITIATOR_IDENTITY_KEYS = frozenset(
    {"InitiatorName", "InitiatorAlias", "TargetName", "SessionType"}
)
#: Keys used only in the Full Feature Phase (RFC 7143 §13.3).
FULL_FEATURE_ONLY_KEYS = frozenset({"SendTargets"})


class Role(Enum):
    INITIATOR = "initiator"
    TARGET = "target"


def parse_number(value: str) -> int | None:
    """A decimal or 0x-hex numeric value (RFC 7143 §6.1), or None when malformed."""
    if not _NUMBER_RE.fullmatch(value):
        return None
    return int(value, 16) if value[:2] in ("0x", "0X") else int(value)


def _bool(value: bool) -> str:
    return YES if value else NO


@dataclass(frozen=True, slots=True)
class OperationalSettings:
    """What our side wants and supports; validated on construction.

    ``header_digests``/``data_digests`` are in preference order. Lengths are in bytes.
    """

    header_digests: tuple[str, ...] = (DIGEST_NONE,)
    data_digests: tuple[str, ...] = (DIGEST_NONE,)
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = SUPPORTED_ERROR_RECOVERY_LEVEL

    def __post_init__(self) -> None:
        for name, digests in (("header", self.header_digests), ("data", self.data_digests)):
            if not digests or any(d not in SUPPORTED_DIGESTS for d in digests):
                raise IscsiConfigError(
                    f"{name} digests {digests!r} must be a non-empty list of CRC32C/None"
                )
        numbers = (
            ("max_connections", self.max_connections),
            ("max_recv_data_segment_length", self.max_recv_data_segment_length),
            ("max_burst_length", self.max_burst_length),
            ("first_burst_length", self.first_burst_length),
            ("default_time2wait", self.default_time2wait),
            ("default_time2retain", self.default_time2retain),
            ("max_outstanding_r2t", self.max_outstanding_r2t),
            ("error_recovery_level", self.error_recovery_level),
        )
        for name, number in numbers:
            spec = _KEYS[_KEY_FOR_SETTING[name]]
            if not spec.low <= number <= spec.high:
                raise IscsiConfigError(f"{name}={number} is outside {spec.low}..{spec.high}")
        if self.first_burst_length > self.max_burst_length:
            raise IscsiConfigError(
                "first_burst_length must not exceed max_burst_length (RFC 7143 §13.14)"
            )
        if self.error_recovery_level != SUPPORTED_ERROR_RECOVERY_LEVEL:
            raise IscsiConfigError("only ErrorRecoveryLevel=0 is implemented")

    def value_of(self, key: str) -> str:
        """Our text value for ``key``."""
        if key == "HeaderDigest":
            return ",".join(self.header_digests)
        if key == "DataDigest":
            return ",".join(self.data_digests)
        attr = _SETTING_FOR_KEY[key]
        value = getattr(self, attr)
        return _bool(value) if isinstance(value, bool) else str(value)


_SETTING_FOR_KEY = {
    "MaxConnections": "max_connections",
    "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data",
    "MaxRecvDataSegmentLength": "max_recv_data_segment_length",
    "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length",
    "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain",
    "MaxOutstandingR2T": "max_outstanding_r2t",
    "DataPDUInOrder": "data_pdu_in_order",
    "DataSequenceInOrder": "data_sequence_in_order",
    "ErrorRecoveryLevel": "error_recovery_level",
}
_KEY_FOR_SETTING = {v: k for k, v in _SETTING_FOR_KEY.items()}


@dataclass(frozen=True, slots=True)
class NegotiatedParameters:
    """The outcome of a login, from our side's point of view.

    ``max_recv_data_segment_length`` bounds what we receive (we declared it);
    ``max_xmit_data_segment_length`` bounds what we send (the peer declared it).
    """

    session_type: str = SESSION_TYPE_NORMAL
    header_digest: bool = False
    data_digest: bool = False
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_recv_data_segment_length: int = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
    max_xmit_data_segment_length: int = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    initiator_name: str = ""
    initiator_alias: str = ""
    target_name: str = ""
    target_alias: str = ""
    target_portal_group_tag: int = 0


def respond_value(key: str, offered: str, ours: str) -> str:
    """The responder's answer to ``key=offered`` given our own value ``ours`` (RFC 7143 §6.2).

    ``ours`` is a list in preference order for list keys. Returns ``Reject`` for values that are
    malformed or out of range. The key must be one of OPERATIONAL_KEYS and not declarative.
    """
    spec = _KEYS[key]
    if spec.kind is _Kind.LIST:
        acceptable = ours.split(",")
        # RFC 7143 §6.2.1: pick the first of the proposer's values we support.
        for candidate in offered.split(","):
            if candidate in acceptable:
                return candidate
        return REJECT
    if spec.kind in (_Kind.AND, _Kind.OR):
        if offered not in (YES, NO):
            return REJECT
        a, b = offered == YES, ours == YES
        return _bool(a and b if spec.kind is _Kind.AND else a or b)
    number = parse_number(offered)
    if number is None or not spec.low <= number <= spec.high:
        return REJECT
    mine = int(ours)
    return str(min(number, mine) if spec.kind is _Kind.MIN else max(number, mine))


def answer_is_valid(key: str, offered: str, answered: str) -> bool:
    """Whether ``answered`` is a legal reply to our offer ``key=offered`` (RFC 7143 §6.2)."""
    spec = _KEYS[key]
    if spec.kind is _Kind.LIST:
        return answered in offered.split(",")
    if spec.kind is _Kind.AND:
        return answered in (YES, NO) and not (offered == NO and answered == YES)
    if spec.kind is _Kind.OR:
        return answered in (YES, NO) and not (offered == YES and answered == NO)
    number = parse_number(answered)
    if number is None or not spec.low <= number <= spec.high:
        return False
    if spec.kind is _Kind.MIN:
        return number <= int(offered)
    if spec.kind is _Kind.MAX:
        return number >= int(offered)
    return True


@dataclass(slots=True)
class Negotiator:
    """Negotiates the operational keys of one login, for either role. Not thread-safe."""

    settings: OperationalSettings
    role: Role
    session_type: str = SESSION_TYPE_NORMAL
    _results: dict[str, str] = field(default_factory=dict)
    _offered: dict[str, str] = field(default_factory=dict)
    _peer_declared: dict[str, str] = field(default_factory=dict)
    _declared: bool = False

    def _relevant(self, key: str) -> bool:
        return not (self.session_type == SESSION_TYPE_DISCOVERY and _KEYS[key].discovery_irrelevant)

    def offers(self) -> TextPairs:
        """Our proposals and declarations, to send once in the operational stage.

        An initiator proposes every relevant key; a target only declares its
        MaxRecvDataSegmentLength (it answers everything else).
        """
        if self._declared:
            return []
        self._declared = True
        pairs: TextPairs = [
            ("MaxRecvDataSegmentLength", str(self.settings.max_recv_data_segment_length))
        ]
        if self.role is Role.TARGET:
            return pairs
        for key in _KEYS:
            if key == "MaxRecvDataSegmentLength" or not self._relevant(key):
                continue
            if key in self._results:
                continue
            value = self.settings.value_of(key)
            self._offered[key] = value
            pairs.append((key, value))
        return pairs

    @property
    def declared(self) -> bool:
        """Whether :meth:`offers` has been sent."""
        return self._declared

    @property
    def awaiting_answers(self) -> bool:
        """True while the peer owes answers to our offers."""
        return bool(self._offered)

    def receive(self, pairs: Sequence[tuple[str, str]]) -> TextPairs:
        """Take the peer's operational keys; return our answers to its offers.

        Raises :class:`NegotiationError` when the peer renegotiates a key, answers outside the
        result function, or offers a special value as if it were a proposal.
        """
        answers: TextPairs = []
        # FirstBurstLength's relevance depends on InitialR2T and ImmediateData, so it goes last.
        ordered = sorted(pairs, key=lambda kv: kv[0] == "FirstBurstLength")
        for key, value in ordered:
            if key in self._offered:
                self._take_answer(key, value)
            elif key in _OBSOLETE_BOOLEAN_KEYS:
                answers.append((key, NO))
            elif key in _OBSOLETE_REJECT_KEYS:
                answers.append((key, REJECT))
            elif key not in _KEYS:
                answers.append((key, NOT_UNDERSTOOD))
            elif key in self._results or key in self._peer_declared:
                raise NegotiationError(f"{key} negotiated twice in one login (RFC 7143 §6.2)")
            elif value in _SPECIAL_ANSWERS:
                raise NegotiationError(f"{key}={value} is an answer, but nothing was offered")
            elif _KEYS[key].kind is _Kind.DECLARATIVE:
                number = parse_number(value)
                spec = _KEYS[key]
                if number is None or not spec.low <= number <= spec.high:
                    answers.append((key, REJECT))
                self._peer_declared[key] = value
            elif not self._relevant(key):
                self._results[key] = IRRELEVANT
                answers.append((key, IRRELEVANT))
            else:
                answer = self._respond(key, value)
                self._results[key] = answer
                answers.append((key, answer))
        return answers

    def _respond(self, key: str, value: str) -> str:
        ours = self.settings.value_of(key)
        if key == "FirstBurstLength":
            if self._value("InitialR2T") == YES and self._value("ImmediateData") == NO:
                return IRRELEVANT  # RFC 7143 §13.14
            burst = self._value("MaxBurstLength")
            ours = str(min(int(ours), int(burst)))
        return respond_value(key, value, ours)

    def _take_answer(self, key: str, value: str) -> None:
        offered = self._offered.pop(key)
        if value in (REJECT, NOT_UNDERSTOOD, IRRELEVANT):
            self._results[key] = value
            return
        if not answer_is_valid(key, offered, value):
            raise NegotiationError(
                f"peer answered {key}={value} to our {key}={offered}, which the result "
                "function does not allow (RFC 7143 §6.2)"
            )
        self._results[key] = value

    def _value(self, key: str) -> str:
        """The negotiated text value, or the default when not (successfully) negotiated."""
        value = self._results.get(key)
        if value is None and key in self._offered:
            # RFC 7143 §6.2.2: an omitted answer to AND=No / OR=Yes means that value.
            offered = self._offered[key]
            kind = _KEYS[key].kind
            if (kind is _Kind.AND and offered == NO) or (kind is _Kind.OR and offered == YES):
                return offered
        if value is None or value in _SPECIAL_ANSWERS:
            return _KEYS[key].default
        return value

    def result(self) -> NegotiatedParameters:
        """The negotiated parameters; names and aliases are filled in by the login layer."""
        peer_mrdsl = self._peer_declared.get("MaxRecvDataSegmentLength")
        xmit = parse_number(peer_mrdsl) if peer_mrdsl is not None else None
        spec = _KEYS["MaxRecvDataSegmentLength"]
        if xmit is None or not spec.low <= xmit <= spec.high:
            xmit = DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
        max_burst = int(self._value("MaxBurstLength"))
        return NegotiatedParameters(
            session_type=self.session_type,
            header_digest=self._value("HeaderDigest") == DIGEST_CRC32C,
            data_digest=self._value("DataDigest") == DIGEST_CRC32C,
            max_connections=int(self._value("MaxConnections")),
            initial_r2t=self._value("InitialR2T") == YES,
            immediate_data=self._value("ImmediateData") == YES,
            max_recv_data_segment_length=(
                self.settings.max_recv_data_segment_length
                if self._declared
                else DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
            ),
            max_xmit_data_segment_length=xmit,
            max_burst_length=max_burst,
            first_burst_length=min(int(self._value("FirstBurstLength")), max_burst),
            default_time2wait=int(self._value("DefaultTime2Wait")),
            default_time2retain=int(self._value("DefaultTime2Retain")),
            max_outstanding_r2t=int(self._value("MaxOutstandingR2T")),
            data_pdu_in_order=self._value("DataPDUInOrder") == YES,
            data_sequence_in_order=self._value("DataSequenceInOrder") == YES,
            error_recovery_level=int(self._value("ErrorRecoveryLevel")),
        )
