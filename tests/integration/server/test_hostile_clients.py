"""Hostile clients against the iSCSI target's connection bounds (real sockets, an in-process
server whose clock the test drives): the login deadline, the per-peer share of the pre-login
pool and who makes way for whom, and refusal when nobody can.

The regressions of issue 12 §2 have their own ``test_bug_*`` files next to this one.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
from hostile_helpers import (
    INITIATOR,
    FakeClock,
    InProcessServer,
    closed_by_peer,
    connect,
    inprocess_server,
    login,
    wait_for,
)

from blockyard.iscsi.pdu import LoginRequest, encode_pdu
from blockyard.iscsi.target_session import LOGIN_TIMEOUT_S, SessionLimits
from blockyard.iscsi.text import encode_text
from blockyard.server.iscsi_limits import PRELOGIN_PER_PEER_MAX
from blockyard.server.iscsi_server import ServerSettings

PEER = "127.0.0.3"
#: The server ticks its connections once a second; a tick is due within this.
TICK_WAIT_S = 3.0
#: Long enough for at least one tick.
TICK_INTERVAL_WAIT_S = 1.5
#: How long to watch a connection that must stay open.
STAYS_OPEN_S = 0.5

Closing = Callable[[socket.socket], socket.socket]


@pytest.fixture
def closing() -> Iterator[Closing]:
    opened: list[socket.socket] = []

    def register(sock: socket.socket) -> socket.socket:
        opened.append(sock)
        return sock

    yield register
    for sock in opened:
        sock.close()


def first_login_request(target: str) -> bytes:
    """A valid first Login Request that does not ask to move on: the login stays open."""
    pairs = [("InitiatorName", INITIATOR), ("TargetName", target), ("AuthMethod", "None")]
    return encode_pdu(LoginRequest(isid=0x400000000777, itt=1, data=encode_text(pairs)))


def test_the_login_deadline_closes_idle_and_half_done_logins_only() -> None:
    clock = FakeClock()
    settings = ServerSettings(limits=SessionLimits(login_timeout_s=LOGIN_TIMEOUT_S))
    with inprocess_server(settings, clock=clock) as served:
        idle = connect(served.portal)
        slow = connect(served.portal)
        slow.sendall(b"\x03" + bytes(20))  # a third of a header, and then nothing
        half = connect(served.portal)
        half.sendall(first_login_request(served.target))
        session = login(served.portal, served.target)
        try:
            wait_for(lambda: served.call(lambda: served.server.prelogin_count) == 3)
            clock.now += LOGIN_TIMEOUT_S - 1
            # At least one tick (once a second) runs in this wait; nobody is over the deadline.
            assert not closed_by_peer(idle, TICK_INTERVAL_WAIT_S)
            assert not closed_by_peer(slow, 0.05)
            clock.now += 2
            for sock in (idle, slow, half):
                assert closed_by_peer(sock, TICK_WAIT_S)
            wait_for(lambda: served.call(lambda: served.server.prelogin_count) == 0)
            # The logged-in session was not subject to the login deadline.
            assert served.call(lambda: served.server.logged_in_count) == 1
        finally:
            for sock in (idle, slow, half):
                sock.close()
            session.close()


def admitted(served: InProcessServer, count: int) -> None:
    wait_for(lambda: served.call(lambda: served.server.prelogin_count) == count)


def test_one_peer_gets_its_share_and_its_oldest_idle_connection_makes_way(
    closing: Closing,
) -> None:
    with inprocess_server(ServerSettings()) as served:
        # A login in progress from the same address, then the peer's share of idle ones.
        busy = closing(connect(served.portal, source=PEER))
        busy.sendall(first_login_request(served.target))
        admitted(served, 1)
        idle = []
        for n in range(PRELOGIN_PER_PEER_MAX - 1):
            idle.append(closing(connect(served.portal, source=PEER)))
            admitted(served, n + 2)
        # One more: the oldest idle one makes way, the login in progress stays.
        newcomer = closing(connect(served.portal, source=PEER))
        assert closed_by_peer(idle[0], TICK_WAIT_S)
        admitted(served, PRELOGIN_PER_PEER_MAX)
        assert not closed_by_peer(busy, STAYS_OPEN_S)
        assert not closed_by_peer(newcomer, STAYS_OPEN_S)
        # Another address is not affected by this peer's share.
        other = closing(connect(served.portal))
        admitted(served, PRELOGIN_PER_PEER_MAX + 1)
        assert not closed_by_peer(other, STAYS_OPEN_S)


def test_a_peer_whose_logins_are_all_in_progress_is_refused(closing: Closing) -> None:
    settings = ServerSettings(prelogin_max=4, prelogin_per_peer_max=2)
    with inprocess_server(settings) as served:
        busy = []
        for n in range(2):
            sock = closing(connect(served.portal, source=PEER))
            sock.sendall(first_login_request(served.target))
            busy.append(sock)
            admitted(served, n + 1)
        wait_for(lambda: served.call(lambda: served.server.prelogin_count) == 2)
        refused = closing(connect(served.portal, source=PEER))
        assert closed_by_peer(refused, TICK_WAIT_S)
        for sock in busy:
            assert not closed_by_peer(sock, STAYS_OPEN_S)
        # Logged-in sessions are not in this pool: a full pool does not stop them from
        # working, and another address can still log in.
        session = login(served.portal, served.target)
        session.close()
