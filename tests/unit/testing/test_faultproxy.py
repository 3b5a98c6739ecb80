"""The fault proxy (blockyard.testing.faultproxy) against real loopback sockets: each fault does
what its docstring says, byte-exact, and the controls are safe from many threads at once."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from blockyard.testing.faultproxy import Direction, FaultProxy

#: Bound on every wait of these tests (generous: the machine is shared).
WAIT_S = 20.0
#: How long "nothing arrives" is watched for.
QUIET_S = 0.5


class Target:
    """A listening socket whose accepted connections the test drives by hand."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(WAIT_S)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def accept(self) -> socket.socket:
        conn, _ = self.listener.accept()
        conn.settimeout(WAIT_S)
        self.accepted.append(conn)
        return conn

    def close(self) -> None:
        for s in [self.listener, *self.accepted]:
            s.close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


@pytest.fixture
def proxy(target: Target) -> Iterator[FaultProxy]:
    with FaultProxy(target.address) as p:
        yield p
        assert p.stats().internal_errors == 0


#: Client sockets of the running test, closed at its end whatever happened.
_CLIENTS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def dial(proxy: FaultProxy) -> socket.socket:
    host, _, port = proxy.address.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=WAIT_S)
    _CLIENTS.append(s)
    s.settimeout(WAIT_S)
    return s


def pair(proxy: FaultProxy, target: Target) -> tuple[socket.socket, socket.socket]:
    client = dial(proxy)
    return client, target.accept()


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(s: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := s.recv(1 << 16):
        buf += chunk
    return bytes(buf)


def assert_quiet(s: socket.socket) -> None:
    """Nothing (no byte, no EOF, no reset) arrives for QUIET_S."""
    s.settimeout(QUIET_S)
    try:
        with pytest.raises(TimeoutError):
            s.recv(1)
    finally:
        s.settimeout(WAIT_S)


def wait_for(predicate: object, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_pass_forwards_both_ways_intact_with_half_close(proxy: FaultProxy, target: Target) -> None:
    client, server = pair(proxy, target)
    up = os.urandom(3 << 20)
    down = os.urandom(3 << 20)
    got: list[bytes] = []
    # The server reads everything up to the client's half-close while sending its own bytes.
    reader = threading.Thread(target=lambda: got.append(recv_all(server)))
    reader.start()
    sender = threading.Thread(target=server.sendall, args=(down,))
    sender.start()
    client.sendall(up)
    client.shutdown(socket.SHUT_WR)
    assert recv_exactly(client, len(down)) == down
    reader.join(WAIT_S)
    sender.join(WAIT_S)
    assert got == [up]
    server.sendall(b"after the client's half-close")
    server.close()
    assert recv_all(client) == b"after the client's half-close"
    stats = proxy.stats()
    assert stats.forwarded_to_target_bytes == len(up)
    assert stats.forwarded_to_client_bytes == len(down) + len(b"after the client's half-close")
    assert stats.dropped_to_target_bytes == stats.dropped_to_client_bytes == 0
    assert stats.accepted == 1
    wait_for(lambda: proxy.stats().open == 0, "the connection to end after both EOFs")
    client.close()


def test_delay_applies_each_way_and_keeps_order(proxy: FaultProxy, target: Target) -> None:
    proxy.set_delay(0.1)
    client, server = pair(proxy, target)
    started = time.monotonic()
    client.sendall(b"ping")
    assert recv_exactly(server, 4) == b"ping"
    server.sendall(b"pong")
    assert recv_exactly(client, 4) == b"pong"
    assert time.monotonic() - started >= 0.2
    # Many small writes arrive whole and in order.
    parts = [i.to_bytes(4, "big") for i in range(2000)]
    for p in parts:
        client.sendall(p)
    assert recv_exactly(server, 4 * len(parts)) == b"".join(parts)
    proxy.set_delay(0.0)
    started = time.monotonic()
    client.sendall(b"x")
    assert recv_exactly(server, 1) == b"x"
    client.close()
    server.close()


def test_one_way_delay(proxy: FaultProxy, target: Target) -> None:
    proxy.set_delay(0.3, Direction.TO_CLIENT)
    client, server = pair(proxy, target)
    started = time.monotonic()
    client.sendall(b"a")
    assert recv_exactly(server, 1) == b"a"
    to_target_s = time.monotonic() - started
    server.sendall(b"b")
    assert recv_exactly(client, 1) == b"b"
    assert time.monotonic() - started - to_target_s >= 0.3
    client.close()
    server.close()


def test_blackhole_is_silence_and_heal_resets_broken_connections(
    proxy: FaultProxy, target: Target
) -> None:
    client, server = pair(proxy, target)
    client.sendall(b"before")
    assert recv_exactly(server, 6) == b"before"
    proxy.blackhole()
    client.sendall(b"x" * 1000)
    server.sendall(b"y" * 700)
    assert_quiet(server)
    assert_quiet(client)
    # The target closing its end is swallowed too: no FIN reaches the client.
    server.close()
    assert_quiet(client)
    stats = proxy.stats()
    assert stats.dropped_to_target_bytes == 1000
    assert stats.dropped_to_client_bytes == 700
    assert stats.open == 1
    proxy.heal()
    # The partition is over and the stream has a hole: the client's connection is reset.
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    client.close()
    stats = proxy.stats()
    assert (stats.open, stats.reset) == (0, 1)
    # New connections flow again.
    client2, server2 = pair(proxy, target)
    client2.sendall(b"again")
    assert recv_exactly(server2, 5) == b"again"
    client2.close()


def test_blackhole_one_way(proxy: FaultProxy, target: Target) -> None:
    client, server = pair(proxy, target)
    proxy.blackhole(Direction.TO_TARGET)
    client.sendall(b"lost")
    server.sendall(b"still flows")
    assert recv_exactly(client, 11) == b"still flows"
    assert_quiet(server)
    assert proxy.stats().dropped_to_target_bytes == 4
    client.close()


def test_new_connections_during_a_blackhole_are_silent(proxy: FaultProxy, target: Target) -> None:
    proxy.blackhole()
    client = dial(proxy)
    server = target.accept()
    client.sendall(b"hello?")
    assert_quiet(server)
    assert_quiet(client)
    proxy.pass_through()
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    client.close()


def test_hold_delivers_everything_in_order_when_lifted(proxy: FaultProxy, target: Target) -> None:
    client, server = pair(proxy, target)
    proxy.hold()
    data = os.urandom(2 << 20)
    sender = threading.Thread(target=lambda: (client.sendall(data), client.shutdown(1)))
    sender.start()
    server.sendall(b"held back")
    assert_quiet(server)
    assert_quiet(client)
    proxy.heal()
    assert recv_all(server) == data
    assert recv_exactly(client, 9) == b"held back"
    sender.join(WAIT_S)
    assert not sender.is_alive()
    assert proxy.stats().dropped_to_target_bytes == 0
    client.close()


def test_cut_resets_both_sides_and_new_connections_work(proxy: FaultProxy, target: Target) -> None:
    client, server = pair(proxy, target)
    client2, server2 = pair(proxy, target)
    assert proxy.cut() == 2
    for s in (client, server, client2, server2):
        with pytest.raises(ConnectionResetError):
            s.recv(1)
        s.close()
    client3, server3 = pair(proxy, target)
    client3.sendall(b"fresh")
    assert recv_exactly(server3, 5) == b"fresh"
    assert proxy.stats().reset == 2
    client3.close()


def expect_reset(proxy: FaultProxy) -> None:
    """Dial the proxy and see the connection reset. The reset may beat connect(): a socket
    with a timeout connects without blocking and reads the outcome from SO_ERROR after the
    poll, which by then can be ECONNRESET; either way the socket is closed."""
    sock: socket.socket | None = None
    try:
        with pytest.raises(ConnectionResetError):
            sock = dial(proxy)
            sock.recv(1)
    finally:
        if sock is not None:
            sock.close()


def test_refuse_resets_new_connections_only(proxy: FaultProxy, target: Target) -> None:
    client, server = pair(proxy, target)
    proxy.refuse()
    expect_reset(proxy)
    client.sendall(b"old one lives")
    assert recv_exactly(server, 13) == b"old one lives"
    proxy.refuse(False)
    client2, server2 = pair(proxy, target)
    client2.sendall(b"ok")
    assert recv_exactly(server2, 2) == b"ok"
    stats = proxy.stats()
    assert (stats.accepted, stats.refused) == (3, 1)
    client.close()
    client2.close()


def test_target_down_resets_the_client_and_a_restarted_target_is_reached(
    target: Target,
) -> None:
    port = target.port
    target.listener.close()
    with FaultProxy(f"127.0.0.1:{port}") as proxy:
        expect_reset(proxy)
        assert proxy.stats().target_unreachable == 1
        # The target comes back on its port: the proxy's address is unchanged.
        target.listener = socket.create_server(("127.0.0.1", port))
        target.listener.settimeout(WAIT_S)
        client, server = pair(proxy, target)
        client.sendall(b"back")
        assert recv_exactly(server, 4) == b"back"
        client.close()


def test_bandwidth_limit_paces_the_link(proxy: FaultProxy, target: Target) -> None:
    rate = 256 << 10
    proxy.set_bandwidth(rate, Direction.TO_TARGET)
    client, server = pair(proxy, target)
    data = os.urandom(256 << 10)
    started = time.monotonic()
    client.sendall(data)
    assert recv_exactly(server, len(data)) == data
    # 16 pieces: the last may start 15 piece-times after the first.
    assert time.monotonic() - started >= 15 * (16 << 10) / rate
    proxy.set_bandwidth(0)
    client.close()


def test_bandwidth_lifted_mid_chunk_delivers_the_rest_at_once(
    proxy: FaultProxy, target: Target
) -> None:
    proxy.set_bandwidth(64 << 10)
    client, server = pair(proxy, target)
    data = os.urandom(64 << 10)  # one chunk: a second at this rate
    client.sendall(data)
    time.sleep(0.2)
    started = time.monotonic()
    proxy.set_bandwidth(0)
    assert recv_exactly(server, len(data)) == data
    assert time.monotonic() - started < 0.5


def test_hold_stops_a_paced_chunk_midway(proxy: FaultProxy, target: Target) -> None:
    proxy.set_bandwidth(64 << 10)
    client, server = pair(proxy, target)
    data = os.urandom(64 << 10)
    client.sendall(data)
    time.sleep(0.3)
    proxy.hold()
    got = bytearray()
    server.settimeout(QUIET_S)
    with pytest.raises(TimeoutError):
        while True:
            got += server.recv(1 << 16)
    server.settimeout(WAIT_S)
    assert 0 < len(got) < len(data)
    proxy.pass_through()
    got += recv_exactly(server, len(data) - len(got))
    assert bytes(got) == data


def test_controls_from_many_threads_while_bytes_flow(proxy: FaultProxy, target: Target) -> None:
    client, server = pair(proxy, target)
    data = os.urandom(4 << 20)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(server)))
    reader.start()
    sender = threading.Thread(target=lambda: (client.sendall(data), client.shutdown(1)))
    sender.start()
    stop = threading.Event()
    errors: list[BaseException] = []

    def fiddle(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                choice = rng.randrange(5)
                if choice == 0:
                    proxy.set_delay(rng.choice([0.0, 0.001, 0.01]))
                elif choice == 1:
                    proxy.hold(rng.choice(list(Direction)))
                elif choice == 2:
                    proxy.heal()
                elif choice == 3:
                    proxy.set_bandwidth(rng.choice([0, 4 << 20]))
                else:
                    proxy.stats()
                time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)

    fiddlers = [threading.Thread(target=fiddle, args=(i,)) for i in range(4)]
    for f in fiddlers:
        f.start()
    time.sleep(1.0)
    stop.set()
    for f in fiddlers:
        f.join(WAIT_S)
    assert not errors, errors
    proxy.pass_through()
    sender.join(WAIT_S)
    reader.join(WAIT_S)
    assert got == [data]
    client.close()


def test_close_resets_connections_and_frees_the_port(target: Target) -> None:
    proxy = FaultProxy(target.address).start()
    port = proxy.port
    client, server = pair(proxy, target)
    proxy.close()
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    client.close()
    with pytest.raises(RuntimeError):
        proxy.cut()
    proxy.close()  # idempotent
    # The same port can be taken again (as a restarted harness would).
    with FaultProxy(target.address, listen_port=port) as again:
        assert again.port == port
        client, server = pair(again, target)
        client.sendall(b"same port")
        assert recv_exactly(server, 9) == b"same port"
        client.close()
