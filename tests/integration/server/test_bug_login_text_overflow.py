"""Regression: a Login Request with about 6 KiB of keys the target does not understand made the
``NotUnderstood`` answers exceed the 8,192 bytes a Login Response may carry, and
``LocalProtocolError: login response text ... too long`` escaped ``data_received``: the
initiator got no Login Response, the connection dropped and the server logged a traceback of
about 20 lines per attempt (30 of 30 attempts).

Against a real `blockyard serve`: the answer is now a Login Response with status 0x0200
("initiator error", RFC 7143 §11.13.5), the connection closes, the log has no traceback, and a
normal login works right after.
"""

from __future__ import annotations

from collections.abc import Callable

from hostile_helpers import INITIATOR, closed_by_peer, connect, login, receive_pdu
from serve_helpers import Serve

from blockyard.iscsi.errors import LoginStatus
from blockyard.iscsi.pdu import LoginRequest, LoginResponse, encode_pdu
from blockyard.iscsi.reader import PduReader, PeerRole
from blockyard.iscsi.text import encode_text

MIB = 1 << 20
ATTEMPTS = 5
CLOSE_TIMEOUT_S = 10.0


def test_too_many_unknown_keys_get_an_initiator_error_response(
    start_serve: Callable[..., Serve],
) -> None:
    serve = start_serve()
    assert serve.api, serve.stderr()
    created = serve.call(lambda c: c.create_volume("keys", 4 * MIB))
    target = created.export.iqn
    portal = serve.iscsi[0]
    pairs = [("InitiatorName", INITIATOR), ("TargetName", target), ("AuthMethod", "None")]
    pairs += [(f"X-k{i:04d}", "v") for i in range(640)]
    request = LoginRequest(isid=0x400000001234, itt=1, transit=True, csg=0, nsg=1,
                           data=encode_text(pairs))  # fmt: skip
    assert len(request.data) > 6000
    for _ in range(ATTEMPTS):
        sock = connect(portal)
        try:
            sock.sendall(encode_pdu(request))
            response = receive_pdu(sock, PduReader(peer=PeerRole.TARGET))
            assert isinstance(response, LoginResponse), response
            assert response.status == LoginStatus.INITIATOR_ERROR == 0x0200
            assert closed_by_peer(sock, CLOSE_TIMEOUT_S)
        finally:
            sock.close()
    session = login(portal, target)
    session.close()
    log = serve.stderr()
    assert "Traceback" not in log and "LocalProtocolError" not in log, log
    assert log.count("need ") >= ATTEMPTS  # one line per refused login, saying why
