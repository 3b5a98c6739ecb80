"""Regression: an exception in an asyncio callback of the iSCSI target was left to asyncio.

It came out of ``data_received`` (the login-text bug of issue 12 §2 was one), and could come out
of ``connection_made``, ``connection_lost``, the flush and tick callbacks, flow control and the
completion of commands run in the thread pool. asyncio then logged it under its own logger
without the peer's address, and one raising in the server's tick stopped the tick for good:
no more login deadlines or NOP-In pings for anybody.

Now each callback is a boundary: the exception is logged once under ``blockyard.server.iscsi``
with the peer's address, that connection is aborted and forgotten by every count, and every
other connection goes on. Each case injects an exception into one connection (real sockets, an
in-process server) and then checks a session opened before and a login after.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hostile_helpers import (
    InProcessServer,
    RawSession,
    closed_by_peer,
    connect,
    inprocess_server,
    login,
    receive_pdu,
    wait_for,
)

from blockyard.iscsi.pdu import DataIn, ScsiCommand, ScsiResponse, encode_pdu
from blockyard.iscsi.target_session import ConnectionState, TargetConnection
from blockyard.server import iscsi_server
from blockyard.server.iscsi_server import ServerSettings

TARGET = "iqn.2026-11.io.blockyard.test:callbacks"
BAD_SOURCE = "127.0.0.2"
BAD_INITIATOR = "iqn.2026-11.io.blockyard.test:bad"
WAIT_S = 10.0
LOGGER = "blockyard.server.iscsi"


class Injected(RuntimeError):
    """The exception the tests inject."""


@pytest.fixture
def served() -> Iterator[InProcessServer]:
    with inprocess_server(ServerSettings(), target=TARGET) as server:
        yield server


class Trap:
    """Arms an injection: the next call of the patched function on an object ``target``
    accepts raises, once."""

    def __init__(self, target: Callable[[Any], bool] = lambda _obj: True) -> None:
        self.target = target
        self.armed = False
        self.fired = threading.Event()

    def fire(self, obj: Any) -> None:
        if self.armed and self.target(obj):
            self.armed = False
            self.fired.set()
            raise Injected("injected by the test")


def bad_session(conn: TargetConnection) -> bool:
    return conn.state is ConnectionState.FULL_FEATURE and (
        conn.params.initiator_name == BAD_INITIATOR
    )


def not_logged_in(conn: TargetConnection) -> bool:
    return conn.state is ConnectionState.LOGIN


def patch(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, trap: Trap) -> None:
    original = getattr(owner, name)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        trap.fire(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def tur_works(session: RawSession) -> None:
    """TEST UNIT READY (twice: the first may report the POWER ON unit attention)."""
    for _ in range(2):
        cmd = ScsiCommand(itt=next(session.itts), cdb=bytes(16), cmd_sn=session.cmd_sn)
        session.cmd_sn += 1
        session.sock.sendall(encode_pdu(cmd))
        response = receive_pdu(session.sock, session.reader)
        assert isinstance(response, ScsiResponse), response
    assert response.status == 0


def read_works(session: RawSession, blocks: int = 8) -> None:
    session.sock.sendall(session.read10_bytes(0, blocks))
    got = 0
    while True:
        pdu = receive_pdu(session.sock, session.reader)
        assert isinstance(pdu, DataIn), pdu
        got += len(pdu.data)
        if pdu.status_present:
            break
    assert got == blocks * 512


def boundary_records(caplog: pytest.LogCaptureFixture, where: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == LOGGER and f"internal error in {where}" in r.getMessage()
    ]


def one_boundary_record(caplog: pytest.LogCaptureFixture, where: str) -> None:
    """Exactly one line for the injected exception, with the peer and the traceback."""
    wait_for(lambda: bool(boundary_records(caplog, where)))
    time.sleep(0.1)  # a second line would come right after the first
    records = boundary_records(caplog, where)
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    assert BAD_SOURCE in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is Injected
    assert not [r for r in caplog.records if r.name == "asyncio"]


def check_recovered(
    served: InProcessServer, caplog: pytest.LogCaptureFixture, where: str, before: RawSession
) -> None:
    one_boundary_record(caplog, where)
    # The session from before still works, and so does a new login.
    tur_works(before)
    after = login(served.portal, TARGET)
    try:
        tur_works(after)
        read_works(after)
    finally:
        after.close()
    # The bad connection left no count behind (only `before` stays logged in).
    wait_for(lambda: served.call(lambda: served.server.logged_in_count) == 1)
    wait_for(lambda: served.call(lambda: served.server.prelogin_count) == 0)


@pytest.fixture
def before(served: InProcessServer) -> Iterator[RawSession]:
    session = login(served.portal, TARGET)
    tur_works(session)
    yield session
    session.close()


@pytest.fixture
def closing() -> Iterator[Callable[[socket.socket], socket.socket]]:
    """Register sockets to close at teardown, whatever the test's outcome."""
    opened: list[socket.socket] = []

    def register(sock: socket.socket) -> socket.socket:
        opened.append(sock)
        return sock

    yield register
    for sock in opened:
        sock.close()


Closing = Callable[[socket.socket], socket.socket]


def test_data_received(
    served: InProcessServer, before: RawSession, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, closing: Closing,
) -> None:  # fmt: skip
    trap = Trap(not_logged_in)
    patch(monkeypatch, TargetConnection, "receive_data", trap)
    bad = closing(connect(served.portal, source=BAD_SOURCE))
    trap.armed = True
    bad.sendall(b"\x43" + bytes(47))
    assert trap.fired.wait(WAIT_S)
    assert closed_by_peer(bad, WAIT_S)
    check_recovered(served, caplog, "data_received", before)


def test_connection_made(
    served: InProcessServer, before: RawSession, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, closing: Closing,
) -> None:  # fmt: skip
    trap = Trap()
    patch(monkeypatch, TargetConnection, "__init__", trap)
    trap.armed = True
    bad = closing(connect(served.portal, source=BAD_SOURCE))
    assert trap.fired.wait(WAIT_S)
    assert closed_by_peer(bad, WAIT_S)
    check_recovered(served, caplog, "connection_made", before)


def test_connection_lost(
    served: InProcessServer, before: RawSession, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, closing: Closing,
) -> None:  # fmt: skip
    trap = Trap(bad_session)
    patch(monkeypatch, TargetConnection, "abort", trap)
    bad = login(served.portal, TARGET, source=BAD_SOURCE, initiator=BAD_INITIATOR)
    closing(bad.sock)
    trap.armed = True
    bad.close()
    assert trap.fired.wait(WAIT_S)
    check_recovered(served, caplog, "connection_lost", before)


def test_flush(
    served: InProcessServer, before: RawSession, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, closing: Closing,
) -> None:  # fmt: skip
    trap = Trap(bad_session)
    patch(monkeypatch, TargetConnection, "data_to_send", trap)
    bad = login(served.portal, TARGET, source=BAD_SOURCE, initiator=BAD_INITIATOR)
    closing(bad.sock)
    trap.armed = True
    bad.sock.sendall(bad.read10_bytes(0, 8))
    assert trap.fired.wait(WAIT_S)
    assert closed_by_peer(bad.sock, WAIT_S)
    check_recovered(served, caplog, "flush", before)


def test_tick_and_the_ticker_keeps_running(
    served: InProcessServer, before: RawSession, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, closing: Closing,
) -> None:  # fmt: skip
    trap = Trap(not_logged_in)
    patch(monkeypatch, TargetConnection, "tick", trap)
    bad = closing(connect(served.portal, source=BAD_SOURCE))
    trap.armed = True
    assert trap.fired.wait(WAIT_S)
    assert closed_by_peer(bad, WAIT_S)
    one_boundary_record(caplog, "tick")
    # The server's ticker survived: a later tick reaches a new connection (and is trapped).
    probe = closing(connect(served.portal))
    trap.fired.clear()
    trap.armed = True
    assert trap.fired.wait(WAIT_S), "the server stopped ticking"
    assert closed_by_peer(probe, WAIT_S)
    wait_for(lambda: len(boundary_records(caplog, "tick")) == 2)
    tur_works(before)


def test_completion_of_an_off_loop_command(
    served: InProcessServer, before: RawSession, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, closing: Closing,
) -> None:  # fmt: skip
    trap = Trap(bad_session)
    patch(monkeypatch, TargetConnection, "command_done", trap)
    bad = login(served.portal, TARGET, source=BAD_SOURCE, initiator=BAD_INITIATOR)
    closing(bad.sock)
    tur_works(bad)  # past the unit attention, on the loop
    trap.armed = True
    sync = ScsiCommand(itt=0x77, cdb=bytes([0x35]) + bytes(9), cmd_sn=bad.cmd_sn)  # SYNC CACHE
    bad.sock.sendall(encode_pdu(sync))
    assert trap.fired.wait(WAIT_S)
    assert closed_by_peer(bad.sock, WAIT_S)
    check_recovered(served, caplog, "off-loop command completion", before)


def test_flow_control(
    served: InProcessServer, before: RawSession, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, closing: Closing,
) -> None:  # fmt: skip
    trap = Trap(lambda proto: proto.peer_host == BAD_SOURCE)
    patch(monkeypatch, iscsi_server._IscsiProtocol, "_update_reading", trap)
    bad = login(
        served.portal, TARGET, source=BAD_SOURCE, rcvbuf_bytes=4096, initiator=BAD_INITIATOR
    )
    closing(bad.sock)
    tur_works(bad)
    trap.armed = True
    # An 8 MiB answer nobody reads fills the transport past its high-water mark:
    # pause_writing is the first callback to change the reading state.
    bad.sock.sendall(bad.read10_bytes(0, 16384))
    assert trap.fired.wait(WAIT_S)
    assert closed_by_peer(bad.sock, WAIT_S)
    check_recovered(served, caplog, "pause_writing", before)
