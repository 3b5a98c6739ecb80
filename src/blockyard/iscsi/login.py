"""Login phase state machines (RFC 7143 §6.3, §11.12, §11.13), target and initiator side.

Both are sans-IO: :class:`TargetLogin` turns Login Requests into Login Responses, and
:class:`InitiatorLogin` turns Login Responses into the next Login Request. Stages run
SecurityNegotiation (0) -> LoginOperationalNegotiation (1) -> FullFeaturePhase (3); either of
the first two may be skipped as the spec allows.

Only new sessions are supported: the initiator sends TSIH 0 and the target assigns a non-zero
TSIH in the final response (RFC 7143 §11.12.6). A login that tries to add or reinstate a
connection (TSIH != 0) is refused with "too many connections" when the session exists (we
negotiate MaxConnections=1) and "session does not exist" otherwise.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol

from blockyard.iscsi.chap import (
    CHAP_KEYS,
    ChapAuthenticator,
    ChapCredentials,
    ChapResponder,
    check_mutual_pair,
)
from blockyard.iscsi.discovery import MAX_NAME_LENGTH, is_valid_iscsi_name
from blockyard.iscsi.errors import (
    AuthenticationError,
    IscsiConfigError,
    LocalProtocolError,
    LoginFailedError,
    LoginRejectedError,
    LoginStatus,
    NegotiationError,
    RemoteProtocolError,
)
from blockyard.iscsi.negotiation import (
    FULL_FEATURE_ONLY_KEYS,
    INITIATOR_IDENTITY_KEYS,
    REJECT,
    SESSION_TYPE_DISCOVERY,
    SESSION_TYPE_NORMAL,
    TARGET_DECLARED_KEYS,
    NegotiatedParameters,
    Negotiator,
    OperationalSettings,
    Role,
    parse_number,
)
from blockyard.iscsi.pdu import LoginRequest, LoginResponse, LoginStage, Pdu
from blockyard.iscsi.text import (
    DEFAULT_MAX_TEXT_LENGTH,
    TextAssembler,
    TextPairs,
    encode_text,
    pairs_to_dict,
    parse_text,
)

ISCSI_VERSION = 0x00  # RFC 7143 §11.12.4: the only defined version
#: Login PDUs carry at most the default MaxRecvDataSegmentLength: nothing is negotiated yet
#: (RFC 7143 §13.12 default 8192).
LOGIN_MAX_DATA_SEGMENT_LENGTH = 8192
#: Bound on Login Request/Response rounds; a real login needs fewer than ten.
MAX_LOGIN_EXCHANGES = 32
MAX_TSIH = 0xFFFF  # RFC 7143 §11.12.6: TSIH is 16 bits, 0 meaning "new session"
_SN_MASK = 0xFFFFFFFF  # RFC 7143 §4.2.2.1: sequence numbers are 32-bit serial numbers

AUTH_METHOD_CHAP = "CHAP"  # RFC 7143 §12.1
AUTH_METHOD_NONE = "None"  # RFC 7143 §12.1
SECURITY_KEYS = CHAP_KEYS | {"AuthMethod"}
_STAGES = (LoginStage.SECURITY_NEGOTIATION, LoginStage.LOGIN_OPERATIONAL_NEGOTIATION)


class LoginState(Enum):
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"
    FAILED = "failed"


def _fail(status: LoginStatus, message: str) -> LoginFailedError:
    return LoginFailedError(message, login_status=status)


def _name_ok(name: str) -> bool:
    return 0 < len(name.encode("utf-8")) <= MAX_NAME_LENGTH and is_valid_iscsi_name(name)


# --- target side -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """What the login needs to know about one target.

    ``chap`` set means initiators must authenticate with these credentials; ``mutual_chap``
    are the target's own credentials for initiators that ask to authenticate the target.
    ``allowed_initiators`` None admits every initiator name.
    """

    name: str
    alias: str = ""
    chap: ChapCredentials | None = None
    mutual_chap: ChapCredentials | None = None
    allowed_initiators: frozenset[str] | None = None
    portal_group_tag: int = 1

    def __post_init__(self) -> None:
        if not _name_ok(self.name):
            raise IscsiConfigError(f"target name {self.name!r} is not a valid iSCSI name")
        if self.mutual_chap is not None and self.chap is None:
            raise IscsiConfigError("mutual CHAP credentials need initiator CHAP credentials too")
        if self.chap is not None:
            check_mutual_pair(self.chap, self.mutual_chap)
        if not 0 <= self.portal_group_tag <= MAX_TSIH:
            raise IscsiConfigError("portal_group_tag is a 16-bit value (RFC 7143 §13.9)")


class TargetDirectory(Protocol):
    """Resolves the TargetName of a Normal session login. Must not block for long."""

    def lookup(self, target_name: str) -> TargetConfig | None: ...


#: ``admit_session(session_type, target)`` -> None to admit the session, or the failure to
#: answer with (e.g. OUT_OF_RESOURCES when the target's session slots are taken). ``target``
#: is None for a Discovery session.
AdmitSession = Callable[[str, TargetConfig | None], LoginFailedError | None]


@dataclass(frozen=True, slots=True)
class TargetLoginSettings:
    """Portal-wide login settings. ``discovery_chap`` protects Discovery sessions."""

    operational: OperationalSettings = field(default_factory=OperationalSettings)
    discovery_chap: ChapCredentials | None = None
    discovery_mutual_chap: ChapCredentials | None = None
    command_window: int = 128
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH

    def __post_init__(self) -> None:
        if not 1 <= self.command_window <= 1 << 16:
            raise IscsiConfigError("command_window must be in 1..65536")
        if self.discovery_mutual_chap is not None and self.discovery_chap is None:
            raise IscsiConfigError("discovery mutual CHAP needs discovery CHAP credentials too")
        if self.discovery_chap is not None:
            check_mutual_pair(self.discovery_chap, self.discovery_mutual_chap)


@dataclass(frozen=True, slots=True)
class TargetLoginResult:
    """A successful login. ``exp_cmd_sn`` is the first CmdSN the session expects and
    ``stat_sn`` the StatSN of the connection's next response."""

    params: NegotiatedParameters
    target: TargetConfig | None
    isid: int
    tsih: int
    cid: int
    exp_cmd_sn: int
    stat_sn: int


class TargetLogin:
    """Target side of one connection's login. Not thread-safe.

    Feed every PDU received during login to :meth:`receive` and send back what it returns.
    After a response with non-zero status the state is FAILED and the connection must be
    closed once the response is sent (RFC 7143 §11.13.5); after the final response the state
    is COMPLETE and :attr:`result` holds the session parameters.

    ``admit_session`` is asked once, right before the final response, whether the new session
    may exist (session limits); it runs only after authentication succeeded, so an initiator
    that cannot authenticate never holds a session slot. A refusal is answered with its
    status and no TSIH is allocated.
    """

    def __init__(
        self,
        directory: TargetDirectory,
        settings: TargetLoginSettings,
        *,
        allocate_tsih: Callable[[], int],
        session_exists: Callable[[int, int], bool] | None = None,
        admit_session: AdmitSession | None = None,
        initial_stat_sn: int | None = None,
    ) -> None:
        self._directory = directory
        self._settings = settings
        self._allocate_tsih = allocate_tsih
        self._session_exists = session_exists
        self._admit_session = admit_session
        self._stat_sn = (
            secrets.randbelow(1 << 32) if initial_stat_sn is None else initial_stat_sn & _SN_MASK
        )
        self._state = LoginState.IN_PROGRESS
        self._result: TargetLoginResult | None = None
        self._failure: LoginFailedError | None = None
        self._assembler = TextAssembler(settings.max_text_length)
        self._exchanges = 0
        self._first: LoginRequest | None = None
        self._stage = LoginStage.SECURITY_NEGOTIATION
        self._cmd_sn = 0
        self._itt = 0
        self._identity: dict[str, str] = {}
        self._target: TargetConfig | None = None
        self._session_type = SESSION_TYPE_NORMAL
        self._negotiator: Negotiator | None = None
        self._auth_required: ChapCredentials | None = None
        self._mutual: ChapCredentials | None = None
        self._auth_method: str | None = None
        self._authenticator: ChapAuthenticator | None = None
        self._authenticated = False
        self._sent_identity = False

    @property
    def state(self) -> LoginState:
        return self._state

    @property
    def result(self) -> TargetLoginResult | None:
        return self._result

    @property
    def failure(self) -> LoginFailedError | None:
        """Why the login failed, for logging; its ``login_status`` is what was answered."""
        return self._failure

    def receive(self, pdu: Pdu) -> LoginResponse:
        """Answer one PDU received during login.

        Peer mistakes never raise: they produce a Login Response with the status the spec asks
        for. Calling this after the login ended raises :class:`LocalProtocolError`.
        """
        if self._state is not LoginState.IN_PROGRESS:
            raise LocalProtocolError(f"login is {self._state.value}; no more requests expected")
        try:
            return self._handle(pdu)
        except RemoteProtocolError as exc:
            status = exc.login_status or LoginStatus.INITIATOR_ERROR
            failure = (
                exc
                if isinstance(exc, LoginFailedError)
                else LoginFailedError(str(exc), login_status=status)
            )
            self._state = LoginState.FAILED
            self._failure = failure
            return self._respond(transit=False, nsg=0, data=b"", status=status)

    # -- request handling --

    def _handle(self, pdu: Pdu) -> LoginResponse:
        if not isinstance(pdu, LoginRequest):
            raise _fail(
                LoginStatus.INVALID_DURING_LOGIN,
                f"{type(pdu).__name__} received during login (RFC 7143 §11.13.5)",
            )
        self._exchanges += 1
        if self._exchanges > MAX_LOGIN_EXCHANGES:
            raise _fail(LoginStatus.INITIATOR_ERROR, "login did not finish within the PDU bound")
        self._itt = pdu.itt
        self._cmd_sn = pdu.cmd_sn
        if self._first is None:
            self._check_first(pdu)
        else:
            self._check_next(pdu)
        if pdu.transit and pdu.cont:
            raise _fail(LoginStatus.INITIATOR_ERROR, "T and C both set (RFC 7143 §11.12.2)")
        if pdu.transit and (pdu.nsg not in (1, 3) or pdu.nsg <= pdu.csg):
            raise _fail(
                LoginStatus.INITIATOR_ERROR,
                f"cannot transit from stage {pdu.csg} to {pdu.nsg} (RFC 7143 §11.12.3)",
            )
        text = self._assembler.add(pdu.data, cont=pdu.cont)
        if text is None:
            # RFC 7143 §11.12.2: answer each C=1 request with an empty response.
            return self._respond(transit=False, nsg=0, data=b"")
        keys = pairs_to_dict(parse_text(text))
        answers: TextPairs = []
        first_answer = not self._sent_identity
        self._take_identity(keys, first=first_answer)
        if first_answer:
            answers += self._identity_declarations()
        if self._stage == LoginStage.SECURITY_NEGOTIATION:
            answers += self._security(keys, pdu)
        elif any(key in SECURITY_KEYS for key in keys):
            raise _fail(
                LoginStatus.INITIATOR_ERROR,
                "security keys outside the SecurityNegotiation stage (RFC 7143 §6.3)",
            )
        answers += self._operational(keys)
        ready = self._stage != LoginStage.SECURITY_NEGOTIATION or self._authenticated
        if pdu.transit and ready:
            return self._transit(pdu.nsg, answers)
        return self._respond(transit=False, nsg=0, data=self._answer_text(answers))

    def _answer_text(self, answers: TextPairs) -> bytes:
        """The encoded answers, or a login failure when they cannot travel in one Login
        Response. Only an initiator can make them that long (a flood of keys we answer
        NotUnderstood or Reject): its mistake, so status class 2, "initiator error"
        (RFC 7143 §11.13.5; no more specific detail code fits)."""
        data = encode_text(answers)
        if len(data) > LOGIN_MAX_DATA_SEGMENT_LENGTH:
            raise _fail(
                LoginStatus.INITIATOR_ERROR,
                f"the answers to this login request need {len(data)} bytes, over the "
                f"{LOGIN_MAX_DATA_SEGMENT_LENGTH} bytes of one Login Response "
                "(RFC 7143 §13.12); the request offered too many keys",
            )
        return data

    def _check_first(self, pdu: LoginRequest) -> None:
        self._first = pdu
        if pdu.version_min > ISCSI_VERSION or pdu.version_max < ISCSI_VERSION:
            raise _fail(
                LoginStatus.UNSUPPORTED_VERSION,
                f"initiator versions {pdu.version_min}..{pdu.version_max} exclude "
                f"{ISCSI_VERSION} (RFC 7143 §11.12.4)",
            )
        if pdu.tsih != 0:
            exists = self._session_exists is not None and self._session_exists(pdu.isid, pdu.tsih)
            raise _fail(
                LoginStatus.TOO_MANY_CONNECTIONS if exists else LoginStatus.SESSION_DOES_NOT_EXIST,
                f"only new sessions are supported (TSIH {pdu.tsih} given)",
            )
        if pdu.csg not in _STAGES:
            raise _fail(LoginStatus.INITIATOR_ERROR, f"login cannot start in stage {pdu.csg}")
        self._stage = LoginStage(pdu.csg)

    def _check_next(self, pdu: LoginRequest) -> None:
        first = self._first
        assert first is not None
        if (pdu.isid, pdu.tsih, pdu.cid) != (first.isid, first.tsih, first.cid):
            raise _fail(
                LoginStatus.INITIATOR_ERROR,
                "ISID, TSIH and CID must stay the same during login (RFC 7143 §11.12)",
            )
        if pdu.csg != self._stage:
            raise _fail(
                LoginStatus.INITIATOR_ERROR,
                f"request in stage {pdu.csg} while the login is in stage {int(self._stage)}",
            )

    def _take_identity(self, keys: dict[str, str], *, first: bool) -> None:
        present = {key: keys.pop(key) for key in INITIATOR_IDENTITY_KEYS if key in keys}
        if not first:
            for key, value in present.items():
                if self._identity.get(key) != value:
                    raise _fail(
                        LoginStatus.INITIATOR_ERROR,
                        f"{key} changed or appeared after the first request (RFC 7143 §13.4)",
                    )
            return
        self._identity = present
        initiator = present.get("InitiatorName")
        if initiator is None:
            raise _fail(LoginStatus.MISSING_PARAMETER, "InitiatorName missing (RFC 7143 §13.5)")
        if not _name_ok(initiator):
            raise _fail(LoginStatus.INITIATOR_ERROR, f"InitiatorName {initiator[:64]!r} invalid")
        session_type = present.get("SessionType", SESSION_TYPE_NORMAL)
        if session_type not in (SESSION_TYPE_NORMAL, SESSION_TYPE_DISCOVERY):
            raise _fail(
                LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {session_type[:32]!r}"
            )
        self._session_type = session_type
        self._negotiator = Negotiator(
            self._settings.operational, Role.TARGET, session_type=session_type
        )
        if session_type == SESSION_TYPE_DISCOVERY:
            self._auth_required = self._settings.discovery_chap
            self._mutual = self._settings.discovery_mutual_chap
        else:
            target_name = present.get("TargetName")
            if target_name is None:
                raise _fail(
                    LoginStatus.MISSING_PARAMETER,
                    "TargetName missing in a Normal session login (RFC 7143 §13.4)",
                )
            target = self._directory.lookup(target_name)
            if target is None:
                raise _fail(LoginStatus.NOT_FOUND, f"no target named {target_name[:223]!r}")
            if target.allowed_initiators is not None and initiator not in (
                target.allowed_initiators
            ):
                raise _fail(
                    LoginStatus.AUTHORIZATION_FAILURE,
                    f"initiator {initiator!r} is not allowed to log in to {target.name!r}",
                )
            self._target = target
            self._auth_required = target.chap
            self._mutual = target.mutual_chap
        if self._auth_required is not None:
            self._authenticator = ChapAuthenticator(self._auth_required, self._mutual)
            if self._stage != LoginStage.SECURITY_NEGOTIATION:
                raise _fail(
                    LoginStatus.AUTHENTICATION_FAILURE,
                    "this target requires CHAP but the login skipped SecurityNegotiation",
                )
        else:
            self._authenticated = self._stage != LoginStage.SECURITY_NEGOTIATION

    def _identity_declarations(self) -> TextPairs:
        self._sent_identity = True
        target = self._target
        if target is None:
            return []
        pairs: TextPairs = []
        if target.alias:
            pairs.append(("TargetAlias", target.alias))
        # RFC 7143 §13.9: returned in the first Login Response of a Normal session.
        pairs.append(("TargetPortalGroupTag", str(target.portal_group_tag)))
        return pairs

    def _security(self, keys: dict[str, str], pdu: LoginRequest) -> TextPairs:
        answers: TextPairs = []
        method = keys.pop("AuthMethod", None)
        chap = {key: keys.pop(key) for key in CHAP_KEYS if key in keys}
        if self._auth_method is None:
            if method is None:
                if chap:
                    raise AuthenticationError(
                        "CHAP keys before AuthMethod was negotiated",
                        login_status=LoginStatus.AUTHENTICATION_FAILURE,
                    )
                if self._auth_required is None:
                    self._authenticated = True
                elif pdu.transit:
                    raise _fail(
                        LoginStatus.AUTHENTICATION_FAILURE,
                        "this target requires CHAP but the initiator did not offer AuthMethod",
                    )
                return answers
            offered = method.split(",")
            wanted = AUTH_METHOD_CHAP if self._auth_required is not None else AUTH_METHOD_NONE
            if wanted not in offered:
                raise _fail(
                    LoginStatus.AUTHENTICATION_FAILURE,
                    f"AuthMethod={method[:64]} does not include {wanted}, which this target "
                    "requires",
                )
            self._auth_method = wanted
            answers.append(("AuthMethod", wanted))
            if wanted == AUTH_METHOD_NONE:
                self._authenticated = True
        elif method is not None:
            raise _fail(LoginStatus.INITIATOR_ERROR, "AuthMethod negotiated twice")
        if not chap:
            return answers
        authenticator = self._authenticator
        if self._auth_method != AUTH_METHOD_CHAP or authenticator is None or self._authenticated:
            raise AuthenticationError(
                "CHAP keys without a CHAP exchange in progress",
                login_status=LoginStatus.AUTHENTICATION_FAILURE,
            )
        if not authenticator.challenged:
            chap_a = chap.pop("CHAP_A", None)
            if chap_a is None or chap:
                raise AuthenticationError(
                    "expected CHAP_A alone to start CHAP (RFC 7143 §12.1.3)",
                    login_status=LoginStatus.AUTHENTICATION_FAILURE,
                )
            return answers + authenticator.challenge(chap_a)
        answers += authenticator.verify(chap)
        self._authenticated = True
        return answers

    def _operational(self, keys: Mapping[str, str]) -> TextPairs:
        negotiator = self._negotiator
        assert negotiator is not None
        answers: TextPairs = []
        offers: TextPairs = []
        for key, value in keys.items():
            if key in TARGET_DECLARED_KEYS or key in FULL_FEATURE_ONLY_KEYS:
                answers.append((key, REJECT))
            else:
                offers.append((key, value))
        try:
            answers += negotiator.receive(offers)
        except NegotiationError as exc:
            raise _fail(LoginStatus.INITIATOR_ERROR, str(exc)) from exc
        if self._stage == LoginStage.LOGIN_OPERATIONAL_NEGOTIATION:
            answers += negotiator.offers()
        return answers

    def _transit(self, nsg: int, answers: TextPairs) -> LoginResponse:
        negotiator = self._negotiator
        assert negotiator is not None
        if nsg == LoginStage.LOGIN_OPERATIONAL_NEGOTIATION:
            answers += negotiator.offers()
            response = self._respond(transit=True, nsg=nsg, data=self._answer_text(answers))
            self._stage = LoginStage.LOGIN_OPERATIONAL_NEGOTIATION
            return response
        answers += negotiator.offers()
        data = self._answer_text(answers)
        target = self._target
        if self._admit_session is not None:
            refusal = self._admit_session(self._session_type, target)
            if refusal is not None:
                raise refusal
        tsih = self._allocate_tsih()
        if not 0 < tsih <= MAX_TSIH:
            raise LocalProtocolError(f"allocate_tsih returned {tsih}, not in 1..{MAX_TSIH}")
        response = self._respond(transit=True, nsg=nsg, data=data, tsih=tsih)
        first = self._first
        assert first is not None
        params = replace(
            negotiator.result(),
            initiator_name=self._identity.get("InitiatorName", ""),
            initiator_alias=self._identity.get("InitiatorAlias", ""),
            target_name=target.name if target is not None else "",
            target_alias=target.alias if target is not None else "",
            target_portal_group_tag=target.portal_group_tag if target is not None else 0,
        )
        self._result = TargetLoginResult(
            params=params,
            target=target,
            isid=first.isid,
            tsih=tsih,
            cid=first.cid,
            exp_cmd_sn=self._cmd_sn,
            stat_sn=self._stat_sn,
        )
        self._state = LoginState.COMPLETE
        return response

    def _respond(
        self, *, transit: bool, nsg: int, data: bytes, status: int = 0, tsih: int = 0
    ) -> LoginResponse:
        if len(data) > LOGIN_MAX_DATA_SEGMENT_LENGTH:
            raise LocalProtocolError(f"login response text of {len(data)} bytes is too long")
        first = self._first
        stat_sn = self._stat_sn
        # RFC 7143 §11.13.4: every response, login ones included, takes the next StatSN.
        self._stat_sn = (stat_sn + 1) & _SN_MASK
        return LoginResponse(
            itt=self._itt,
            isid=first.isid if first is not None else 0,
            tsih=tsih,
            stat_sn=stat_sn,
            exp_cmd_sn=self._cmd_sn,
            max_cmd_sn=(self._cmd_sn + self._settings.command_window - 1) & _SN_MASK,
            status=status,
            transit=transit,
            csg=int(self._stage),
            nsg=nsg if transit else 0,
            version_max=ISCSI_VERSION,
            version_active=ISCSI_VERSION,
            data=data,
        )


# --- initiator side --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitiatorLoginSettings:
    """What an initiator logs in with. ``target_name`` None means a Discovery session;
    ``target_chap`` are the credentials the target must prove (mutual CHAP)."""

    initiator_name: str
    isid: int
    target_name: str | None = None
    initiator_alias: str = ""
    cid: int = 0
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None
    operational: OperationalSettings = field(default_factory=OperationalSettings)

    def __post_init__(self) -> None:
        if not _name_ok(self.initiator_name):
            raise IscsiConfigError(f"initiator name {self.initiator_name!r} is not valid")
        if self.target_name is not None and not _name_ok(self.target_name):
            raise IscsiConfigError(f"target name {self.target_name!r} is not valid")
        if self.target_chap is not None and self.chap is None:
            raise IscsiConfigError("mutual CHAP needs our own CHAP credentials too")
        if self.chap is not None:
            check_mutual_pair(self.chap, self.target_chap)


@dataclass(frozen=True, slots=True)
class InitiatorLoginResult:
    """A successful login from the initiator's side. ``cmd_sn`` is the next CmdSN to use and
    ``exp_stat_sn`` the next StatSN expected."""

    params: NegotiatedParameters
    tsih: int
    isid: int
    cid: int
    cmd_sn: int
    exp_stat_sn: int
    max_cmd_sn: int


class InitiatorLogin:
    """Initiator side of a login. Not thread-safe.

    Send :meth:`start`'s request, then feed each Login Response to :meth:`receive`, which
    returns the next request or None once the Full Feature Phase is reached. Failures raise:
    :class:`LoginRejectedError` when the target answers with a non-zero status,
    :class:`AuthenticationError` when the target fails mutual CHAP, other
    :class:`RemoteProtocolError` subclasses when the target breaks the protocol.
    """

    def __init__(self, settings: InitiatorLoginSettings, *, itt: int = 0, cmd_sn: int = 0) -> None:
        self._settings = settings
        self._itt = itt
        self._cmd_sn = cmd_sn & _SN_MASK
        self._exp_stat_sn = 0
        session_type = (
            SESSION_TYPE_DISCOVERY if settings.target_name is None else SESSION_TYPE_NORMAL
        )
        self._negotiator = Negotiator(
            settings.operational, Role.INITIATOR, session_type=session_type
        )
        self._chap = (
            ChapResponder(settings.chap, settings.target_chap)
            if settings.chap is not None
            else None
        )
        self._stage = LoginStage.SECURITY_NEGOTIATION
        self._assembler = TextAssembler()
        self._last: LoginRequest | None = None
        self._exchanges = 0
        self._auth_method_agreed = False
        self._chap_sent = False
        self._authenticated = False
        self._result: InitiatorLoginResult | None = None
        self._identity: dict[str, str] = {}

    @property
    def result(self) -> InitiatorLoginResult | None:
        return self._result

    def start(self) -> LoginRequest:
        """The first Login Request: identity keys and the AuthMethod offer."""
        if self._last is not None:
            raise LocalProtocolError("start() may be called once per login")
        s = self._settings
        pairs: TextPairs = [("InitiatorName", s.initiator_name)]
        if s.initiator_alias:
            pairs.append(("InitiatorAlias", s.initiator_alias))
        if s.target_name is None:
            pairs.append(("SessionType", SESSION_TYPE_DISCOVERY))
        else:
            pairs += [("SessionType", SESSION_TYPE_NORMAL), ("TargetName", s.target_name)]
        if self._chap is None:
            pairs.append(("AuthMethod", AUTH_METHOD_NONE))
            return self._request(pairs, transit=True, nsg=LoginStage.LOGIN_OPERATIONAL_NEGOTIATION)
        pairs.append(("AuthMethod", AUTH_METHOD_CHAP))
        return self._request(pairs, transit=False, nsg=0)

    def receive(self, pdu: Pdu) -> LoginRequest | None:
        """Consume one Login Response; return the next request, or None when logged in."""
        if self._last is None or self._result is not None:
            raise LocalProtocolError("receive() needs a started, unfinished login")
        if not isinstance(pdu, LoginResponse):
            raise RemoteProtocolError(f"{type(pdu).__name__} received during login", fatal=True)
        if pdu.status != 0:
            known = pdu.status in LoginStatus._value2member_map_
            raise LoginRejectedError(
                f"target refused the login with status {pdu.status:#06x}",
                login_status=LoginStatus(pdu.status) if known else None,
                fatal=True,
            )
        self._exchanges += 1
        if self._exchanges > MAX_LOGIN_EXCHANGES:
            raise RemoteProtocolError("login did not finish within the PDU bound", fatal=True)
        last = self._last
        if pdu.itt != last.itt or pdu.isid != last.isid:
            raise RemoteProtocolError(
                "Login Response ITT/ISID do not match the request", fatal=True
            )
        if pdu.version_active != ISCSI_VERSION:
            raise RemoteProtocolError(f"target chose version {pdu.version_active}", fatal=True)
        if pdu.csg != last.csg:
            raise RemoteProtocolError("Login Response is for another stage", fatal=True)
        if pdu.transit and (not last.transit or pdu.nsg != last.nsg):
            raise RemoteProtocolError(
                "target transited without being asked to, or to another stage (RFC 7143 §11.13.3)",
                fatal=True,
            )
        self._exp_stat_sn = (pdu.stat_sn + 1) & _SN_MASK
        try:
            text = self._assembler.add(pdu.data, cont=pdu.cont)
        except RemoteProtocolError as exc:
            exc.fatal = True
            raise
        if text is None:
            # RFC 7143 §11.13.2: ask for the rest of the text with an empty request.
            return self._request([], transit=False, nsg=0)
        keys = pairs_to_dict(parse_text(text))
        answers: TextPairs = []
        for key in ("TargetAlias", "TargetPortalGroupTag"):
            if key in keys:
                self._identity[key] = keys.pop(key)
        if self._stage == LoginStage.SECURITY_NEGOTIATION:
            answers += self._security(keys, transit=pdu.transit)
        elif any(key in SECURITY_KEYS for key in keys):
            raise RemoteProtocolError("security keys in the operational stage", fatal=True)
        offers = [(k, v) for k, v in keys.items() if k not in INITIATOR_IDENTITY_KEYS]
        answers += self._negotiator.receive(offers)
        if pdu.transit:
            self._stage = LoginStage(pdu.nsg)
            if self._stage == LoginStage.FULL_FEATURE_PHASE:
                self._finish(pdu)
                return None
            answers += self._negotiator.offers()
            return self._request(answers, transit=True, nsg=LoginStage.FULL_FEATURE_PHASE)
        if self._stage == LoginStage.SECURITY_NEGOTIATION:
            # Once our CHAP response is out, ask to transit: the target answers mutual CHAP
            # in the transit response itself.
            if self._authenticated or self._chap_sent:
                return self._request(
                    answers, transit=True, nsg=LoginStage.LOGIN_OPERATIONAL_NEGOTIATION
                )
            return self._request(answers, transit=False, nsg=0)
        answers += self._negotiator.offers()
        return self._request(answers, transit=True, nsg=LoginStage.FULL_FEATURE_PHASE)

    def _security(self, keys: dict[str, str], *, transit: bool) -> TextPairs:
        method = keys.pop("AuthMethod", None)
        chap = {key: keys.pop(key) for key in CHAP_KEYS if key in keys}
        wanted = AUTH_METHOD_NONE if self._chap is None else AUTH_METHOD_CHAP
        if method is not None:
            if method != wanted or self._auth_method_agreed:
                raise AuthenticationError(
                    f"target answered AuthMethod={method[:32]}; we offered {wanted}",
                    login_status=LoginStatus.AUTHENTICATION_FAILURE,
                    fatal=True,
                )
            self._auth_method_agreed = True
        if self._chap is None:
            if chap:
                raise AuthenticationError("unexpected CHAP keys", fatal=True)
            self._authenticated = True
            return []
        if not self._auth_method_agreed:
            raise AuthenticationError("target did not agree to CHAP", fatal=True)
        if not self._chap_sent:
            if not chap:
                if transit:
                    raise AuthenticationError("target skipped CHAP", fatal=True)
                return ChapResponder.offer()
            self._chap_sent = True
            response = self._chap.respond(chap)
            if not self._chap.expects_target_proof:
                self._authenticated = True
            return response
        if self._chap.expects_target_proof and not self._authenticated:
            if not chap and not transit:
                return []
            self._chap.verify_target(chap)
            self._authenticated = True
        elif chap:
            raise AuthenticationError("unexpected CHAP keys after authentication", fatal=True)
        if transit and not self._authenticated:
            raise AuthenticationError("target transited before authentication ended", fatal=True)
        return []

    def _finish(self, pdu: LoginResponse) -> None:
        if pdu.tsih == 0:
            raise RemoteProtocolError(
                "final Login Response has TSIH 0 (RFC 7143 §11.13.3)", fatal=True
            )
        tpgt = parse_number(self._identity.get("TargetPortalGroupTag", "0")) or 0
        s = self._settings
        params = replace(
            self._negotiator.result(),
            initiator_name=s.initiator_name,
            initiator_alias=s.initiator_alias,
            target_name=s.target_name or "",
            target_alias=self._identity.get("TargetAlias", ""),
            target_portal_group_tag=tpgt,
        )
        self._result = InitiatorLoginResult(
            params=params,
            tsih=pdu.tsih,
            isid=s.isid,
            cid=s.cid,
            cmd_sn=pdu.exp_cmd_sn,
            exp_stat_sn=self._exp_stat_sn,
            max_cmd_sn=pdu.max_cmd_sn,
        )

    def _request(self, pairs: TextPairs, *, transit: bool, nsg: int) -> LoginRequest:
        request = LoginRequest(
            itt=self._itt,
            isid=self._settings.isid,
            tsih=0,
            cid=self._settings.cid,
            cmd_sn=self._cmd_sn,
            exp_stat_sn=self._exp_stat_sn,
            transit=transit,
            csg=int(self._stage),
            nsg=nsg if transit else 0,
            version_max=ISCSI_VERSION,
            version_min=ISCSI_VERSION,
            data=encode_text(pairs),
        )
        self._last = request
        return request
