"""Regression: a login beyond the per-target session limit completed and was then dropped.

Sixteen raw logged-in sessions (no authentication, answering NOPs) hold every session slot of
a target. The seventeenth login used to succeed (a TSIH, the Full Feature Phase) and the
connection was closed right after, which an initiator sees as a flaky path and retries at
once. Now the final Login Response says why: status 0x0302 "out of resources" (RFC 7143
§11.13.5), decided before the session exists.

Also pinned here (it already held): only sessions that completed login hold a target's slots;
connections still logging in and Discovery sessions take none, and a slot comes back when its
session ends. What this does not give without authentication is said in docs/ARCHITECTURE.md
("Connection and memory bounds"): anyone who can reach the portal can take the slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hostile_helpers import RawSession, connect, login
from serve_helpers import Serve

from blockyard.iscsi.errors import LoginRejectedError, LoginStatus
from blockyard.server.iscsi_limits import SESSIONS_PER_TARGET_MAX

MIB = 1 << 20
WAIT_S = 10.0


def login_eventually(portal: str, target: str) -> RawSession:
    """Log in, retrying while the server has not yet noticed a session that just closed."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return login(portal, target)
        except LoginRejectedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_login_beyond_the_target_limit_is_answered_out_of_resources(
    start_serve: Callable[..., Serve],
) -> None:
    serve = start_serve()
    assert serve.api, serve.stderr()
    full = serve.call(lambda c: c.create_volume("full", 4 * MIB)).export.iqn
    other = serve.call(lambda c: c.create_volume("other", 4 * MIB)).export.iqn
    portal = serve.iscsi[0]
    # Connections that never log in and Discovery sessions hold no slot of a target.
    idle = [connect(portal) for _ in range(4)]
    discovery = [login(portal, None) for _ in range(4)]
    sessions: list[RawSession] = []
    try:
        sessions += [login(portal, full) for _ in range(SESSIONS_PER_TARGET_MAX)]
        with pytest.raises(LoginRejectedError) as refused:
            login(portal, full)
        assert refused.value.login_status is LoginStatus.OUT_OF_RESOURCES
        # Another target's slots are its own.
        sessions.append(login(portal, other))
        # A slot comes back when its session ends.
        sessions.pop(0).close()
        sessions.append(login_eventually(portal, full))
        with pytest.raises(LoginRejectedError):
            login(portal, full)
    finally:
        for session in sessions + discovery:
            session.close()
        for sock in idle:
            sock.close()
    log = serve.stderr()
    assert "Traceback" not in log, log
