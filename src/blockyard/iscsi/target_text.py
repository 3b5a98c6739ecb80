"""Text requests in the Full Feature Phase (a mixin of
:class:`~blockyard.iscsi.target_session.TargetConnection`): SendTargets, refusal of
renegotiation, and long answers split over continued Text Responses (RFC 7143 §11.10).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockyard.iscsi.errors import RejectReason, RemoteProtocolError
from blockyard.iscsi.negotiation import (
    NOT_UNDERSTOOD,
    OPERATIONAL_KEYS,
    REJECT,
    NegotiatedParameters,
)
from blockyard.iscsi.pdu import RESERVED_TAG, Pdu, TextRequest, TextResponse
from blockyard.iscsi.target_types import SessionLimits, TargetPortal
from blockyard.iscsi.text import TextAssembler, TextPairs, encode_text, parse_text, split_text


class TextRequests:
    """Text requests; uses the connection's state (declared below)."""

    if TYPE_CHECKING:
        _discovery: bool
        _exp_cmd_sn: int
        _initiator_name: str
        _limits: SessionLimits
        _params: NegotiatedParameters
        _portal: TargetPortal
        _target_name: str
        _text: TextAssembler
        _text_pending: tuple[int, int, list[bytes]] | None

        def _next_stat_sn(self) -> int: ...
        def _next_ttt(self) -> int: ...
        def _reject_pdu(self, reason: RejectReason, pdu: Pdu) -> None: ...
        def _send(self, pdu: Pdu) -> None: ...
        def _window(self) -> int: ...

    def _on_text(self, req: TextRequest) -> None:
        pending = self._text_pending
        if req.ttt != RESERVED_TAG:
            if pending is None or pending[0] != req.itt or pending[1] != req.ttt:
                self._reject_pdu(RejectReason.INVALID_PDU_FIELD, req)
                return
            self._send_text_chunk(req.itt, pending[2])
            return
        self._text_pending = None
        try:
            text = self._text.add(req.data, cont=req.cont)
            if text is None:
                # RFC 7143 §11.10.2: each C=1 request is answered with an empty response.
                self._send(self._text_response(req.itt, self._next_ttt(), b"", final=False))
                return
            pairs = parse_text(text)
        except RemoteProtocolError:
            self._reject_pdu(RejectReason.PROTOCOL_ERROR, req)
            return
        answers: TextPairs = []
        for key, value in pairs:
            if key == "SendTargets":
                answers += self._portal.send_targets(
                    value,
                    initiator_name=self._initiator_name,
                    session_target=None if self._discovery else self._target_name,
                )
            elif key in OPERATIONAL_KEYS:
                # Renegotiation in the Full Feature Phase is not supported (RFC 7143 §6.2).
                answers.append((key, REJECT))
            else:
                answers.append((key, NOT_UNDERSTOOD))
        encoded = encode_text(answers)[: self._limits.text_response_bytes_max]
        chunks = split_text(encoded, self._params.max_xmit_data_segment_length)
        self._send_text_chunk(req.itt, chunks)

    def _send_text_chunk(self, itt: int, chunks: list[bytes]) -> None:
        first, rest = chunks[0], chunks[1:]
        if rest:
            ttt = self._next_ttt()
            self._text_pending = (itt, ttt, rest)
            self._send(self._text_response(itt, ttt, first, final=False, cont=True))
        else:
            self._text_pending = None
            self._send(self._text_response(itt, RESERVED_TAG, first, final=True))

    def _text_response(
        self, itt: int, ttt: int, data: bytes, *, final: bool, cont: bool = False
    ) -> TextResponse:
        return TextResponse(
            itt=itt,
            ttt=ttt,
            stat_sn=self._next_stat_sn(),
            exp_cmd_sn=self._exp_cmd_sn,
            max_cmd_sn=self._window(),
            final=final,
            cont=cont,
            data=data,
        )
