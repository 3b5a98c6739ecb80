"""Raw-socket iSCSI clients for the hostile-client tests: idle TCP connections, logins that
stop halfway, logged-in sessions that queue READs and never read the answers, and a look at a
process's resident memory; plus an in-process server on its own thread for tests that reach
into it. Blocking sockets with timeouts; the login is the real sans-IO initiator code, so a
session here is what any initiator would get."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import selectors
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar, cast

from blockyard.iscsi.login import InitiatorLogin, InitiatorLoginSettings, TargetConfig
from blockyard.iscsi.pdu import (
    RESERVED_TAG,
    LoginRequest,
    LoginResponse,
    NopIn,
    NopOut,
    Pdu,
    ScsiCommand,
    encode_pdu,
)
from blockyard.iscsi.reader import NEED_DATA, PduReader, PeerRole
from blockyard.scsi.alua import StaticAlua
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.reservations import MemoryReservationStore
from blockyard.server.iscsi_server import (
    DictTargetRegistry,
    IscsiServer,
    ServedTarget,
    ServerSettings,
)
from blockyard.testing.memdev import MemoryBlockDevice

T = TypeVar("T")
SOCKET_TIMEOUT_S = 10.0
INITIATOR = "iqn.2026-11.io.blockyard.test:hostile"
_ISIDS = itertools.count(0x400000000001)


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS line for pid {pid}")


def connect(
    portal: str, *, source: str | None = None, rcvbuf_bytes: int | None = None
) -> socket.socket:
    """A TCP connection to ``portal`` (HOST:PORT), optionally from a given local address and
    with a small receive buffer (so unread answers pile up on the server, not in our kernel)."""
    host, _, port = portal.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf_bytes is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(SOCKET_TIMEOUT_S)
        sock.connect((host, int(port)))
    except OSError:
        sock.close()
        raise
    return sock


def receive_pdu(sock: socket.socket, reader: PduReader) -> Pdu | None:
    """The next PDU, or None when the peer closed the connection first."""
    while True:
        pdu = reader.next_pdu()
        if pdu is not NEED_DATA:
            return pdu
        data = sock.recv(1 << 16)
        if not data:
            return None
        reader.receive_data(data)


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the peer closes (EOF or reset) within ``timeout_s``; data read meanwhile is
    discarded."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(1 << 16):
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return False


@dataclass
class RawSession:
    """A logged-in Normal session driven by hand."""

    sock: socket.socket
    cmd_sn: int
    reader: PduReader = field(default_factory=lambda: PduReader(peer=PeerRole.TARGET))
    itts: Iterator[int] = field(default_factory=lambda: itertools.count(0x100))

    def read10_bytes(self, lba: int, blocks: int, block_size: int = 512) -> bytes:
        """An encoded READ(10) with the next CmdSN (not sent)."""
        cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0) + bytes(6)
        cmd = ScsiCommand(
            itt=next(self.itts),
            cdb=cdb,
            expected_data_transfer_length=blocks * block_size,
            cmd_sn=self.cmd_sn,
            read=True,
        )
        self.cmd_sn = (self.cmd_sn + 1) & 0xFFFFFFFF
        return encode_pdu(cmd)

    def next_answer(self) -> Pdu | None:
        """The next PDU that is not a NOP-In ping (pings are answered, RFC 7143 §11.19)."""
        while True:
            pdu = receive_pdu(self.sock, self.reader)
            if not isinstance(pdu, NopIn) or pdu.ttt == RESERVED_TAG:
                return pdu
            pong = NopOut(itt=RESERVED_TAG, ttt=pdu.ttt, cmd_sn=self.cmd_sn, immediate=True)
            self.sock.sendall(encode_pdu(pong))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def login(
    portal: str,
    target: str | None,
    *,
    source: str | None = None,
    rcvbuf_bytes: int | None = None,
    initiator: str = INITIATOR,
) -> RawSession:
    """Log in to ``target`` (None: a Discovery session) without authentication. A refusal
    raises the initiator's LoginRejectedError, which carries the target's login status."""
    sock = connect(portal, source=source, rcvbuf_bytes=rcvbuf_bytes)
    try:
        settings = InitiatorLoginSettings(
            initiator_name=initiator, isid=next(_ISIDS), target_name=target
        )
        session = RawSession(sock, 0)
        machine = InitiatorLogin(settings, itt=1)
        request: LoginRequest | None = machine.start()
        while request is not None:
            sock.sendall(encode_pdu(request))
            response = receive_pdu(sock, session.reader)
            assert isinstance(response, LoginResponse), f"login got {response!r}"
            request = machine.receive(response)
        result = machine.result
        assert result is not None
        session.cmd_sn = result.cmd_sn
        session.reader.configure(max_data_segment_length=(1 << 24) - 1)
        return session
    except BaseException:
        sock.close()
        raise


class IdleFlood:
    """Keeps ``count`` idle TCP connections per source address open to ``portal``, opening a
    new one whenever the server closes one, until stopped. Runs in its own thread."""

    def __init__(self, portal: str, sources: dict[str, int]) -> None:
        self._portal = portal
        self._sources = sources
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-flood", daemon=True)
        self.opened = 0
        self.dropped = 0
        self.failed_connects = 0

    def __enter__(self) -> IdleFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=SOCKET_TIMEOUT_S * 2)
        assert not self._thread.is_alive(), "the flood thread did not stop"

    def _open(self, source: str) -> socket.socket | None:
        try:
            sock = connect(self._portal, source=source)
        except OSError:
            self.failed_connects += 1
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _run(self) -> None:
        missing = dict(self._sources)
        with selectors.DefaultSelector() as selector:
            while not self._stop.is_set():
                for source, count in missing.items():
                    for _ in range(count):
                        sock = self._open(source)
                        if sock is not None:
                            selector.register(sock, selectors.EVENT_READ, source)
                            missing[source] -= 1
                if not selector.get_map():
                    self._stop.wait(0.05)
                    continue
                for key, _events in selector.select(timeout=0.05):
                    sock = cast(socket.socket, key.fileobj)
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        continue  # nothing is owed to a connection that never sent anything
                    selector.unregister(sock)
                    sock.close()
                    self.dropped += 1
                    missing[key.data] += 1
            for key in list(selector.get_map().values()):
                cast(socket.socket, key.fileobj).close()


@dataclass
class InProcessServer:
    """An IscsiServer over a memory volume, on its own event loop in a thread, for tests that
    reach into the server (inject faults, read its counts, drive its clock)."""

    server: IscsiServer
    loop: asyncio.AbstractEventLoop
    target: str

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop and return its result."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=SOCKET_TIMEOUT_S)


class FakeClock:
    """A settable clock the server's connections read (from the server's thread)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def inprocess_server(
    settings: ServerSettings | None = None,
    *,
    clock: Callable[[], float] | None = None,
    blocks: int = 32768,
    target: str = "iqn.2026-11.io.blockyard.test:inproc",
) -> Iterator[InProcessServer]:
    loop = asyncio.new_event_loop()
    lu = LogicalUnit(
        MemoryBlockDevice(blocks), LuIdentity(uuid.uuid4()), StaticAlua.single(),
        MemoryReservationStore(),
    )  # fmt: skip
    registry = DictTargetRegistry([ServedTarget(TargetConfig(target), lu)])
    server = IscsiServer(registry, "127.0.0.1", 0, settings=settings, clock=clock)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="iscsi-server", daemon=True)
    thread.start()
    assert ready.wait(SOCKET_TIMEOUT_S), "the in-process server did not start"
    try:
        yield InProcessServer(server, loop, target)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(2.0), loop).result(SOCKET_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(SOCKET_TIMEOUT_S)
        loop.close()


def wait_for(condition: Callable[[], bool], timeout_s: float = SOCKET_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
