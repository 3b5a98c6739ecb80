"""A TCP proxy that injects network faults between two processes, for tests and chaos runs.

Put it in the path of one TCP service and tell the client the proxy's address instead::

    with FaultProxy("127.0.0.1:7001") as proxy:   # the real service (e.g. a replica)
        use(proxy.address)                        # the client (e.g. a primary) dials this
        proxy.set_delay(0.2)                      # 200 ms each way
        proxy.blackhole()                         # a partition: silence, no RST
        proxy.pass_through()                      # every fault off
        proxy.cut()                               # RST every open connection

The proxy's port stays the same for its whole life, so a client that names the service by
address (a replica is named by its replication address) keeps one name while the service
behind it restarts: each new connection to the proxy dials the target anew, and a target that
is down makes the proxy reset the client's connection (as a refused connect would).

Faults, per direction (:class:`Direction`; default both) unless said otherwise:

- **pass**: bytes are forwarded as they come; EOF (half-close) is forwarded.
- **delay** (:meth:`set_delay`): each chunk is delivered no earlier than ``delay_s`` after the
  proxy read it, order kept. Throughput is bounded only by :data:`QUEUE_CHUNKS` chunks in
  flight per direction and connection (a long pipe, not a slow one).
- **bandwidth** (:meth:`set_bandwidth`): at most ``bytes_per_s`` per direction over all
  connections together (a shared link), paced in pieces of :data:`PACED_PIECE_BYTES`.
- **blackhole** (:meth:`blackhole`): bytes *and* EOFs and resets that would be delivered are
  discarded, so each peer sees silence (a partition: no RST, no FIN). A connection that lost
  anything is broken, as one whose partition outlasted TCP's retransmissions; when a blackhole
  is lifted (:meth:`heal`, :meth:`pass_through`), broken connections are reset, as a peer that
  gave up on a connection answers the other side's retransmissions with RST. New connections
  made meanwhile are accepted and dialled (the target sees a silent connection).
- **hold** (:meth:`hold`): nothing is read or delivered; the kernel's socket buffers fill and
  the sender's writes stall. Lifted, everything held is delivered intact and in order: a
  partition shorter than TCP's patience.
- **cut** (:meth:`cut`, both directions, at once): every open connection is reset (RST) on
  both sides.
- **refuse** (:meth:`refuse`, new connections only): each is reset as soon as it is accepted;
  the listener stays open so the port stays the proxy's.

Threads: the proxy runs its own event loop on a daemon thread. Every control method is
thread-safe, runs on that loop and returns once the change is in force: every byte delivered
after it returns obeys it. Each waits at most :data:`CONTROL_TIMEOUT_S` (then raises
``TimeoutError``). Inside the proxy, forwarding waits for the peers and the controller (a hold
lasts until lifted); :meth:`close` resets every connection and ends every wait, bounded by
:data:`CLOSE_TIMEOUT_S`. Memory is bounded by :data:`QUEUE_CHUNKS` times :data:`CHUNK_BYTES` per
direction and connection, plus the kernel's socket buffers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import itertools
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, TypeVar

T = TypeVar("T")

log = logging.getLogger("blockyard.testing.faultproxy")

#: Bytes read from a socket per call (and the largest chunk delivered at once).
CHUNK_BYTES: Final = 64 << 10
#: Chunks in flight per direction and connection between the reading and the delivering side.
QUEUE_CHUNKS: Final = 256
#: Bandwidth pacing granularity: a rate-limited chunk is delivered in pieces this large.
PACED_PIECE_BYTES: Final = 16 << 10
#: Longest a control call waits for the proxy's loop.
CONTROL_TIMEOUT_S: Final = 10.0
#: Longest the proxy waits to dial its target for a new connection.
CONNECT_TIMEOUT_S: Final = 5.0
#: Longest :meth:`FaultProxy.start` waits for the listener and :meth:`FaultProxy.close` for
#: every connection to end and the loop thread to exit.
START_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 10.0
#: SO_LINGER on, zero seconds: close() sends RST instead of FIN (socket(7)).
_LINGER_RST: Final = struct.pack("ii", 1, 0)
_LINGER_OFF: Final = struct.pack("ii", 0, 0)


class Direction(enum.Flag):
    """Which way bytes travel: from the client (who dialled the proxy) to the target, back,
    or both."""

    TO_TARGET = enum.auto()
    TO_CLIENT = enum.auto()
    BOTH = TO_TARGET | TO_CLIENT


_NO_DIRECTION: Final = Direction(0)

_ONE_WAY: Final = (Direction.TO_TARGET, Direction.TO_CLIENT)


class Mode(enum.Enum):
    """What happens to bytes travelling one way (see the module docstring)."""

    PASS = "pass"
    HOLD = "hold"
    BLACKHOLE = "blackhole"


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counters since the proxy started (a snapshot)."""

    accepted: int
    refused: int
    #: Connections reset by :meth:`FaultProxy.cut`, by a heal (broken ones) or by close.
    reset: int
    #: Clients reset because the target could not be dialled.
    target_unreachable: int
    open: int
    forwarded_to_target_bytes: int
    forwarded_to_client_bytes: int
    dropped_to_target_bytes: int
    dropped_to_client_bytes: int
    #: Forwarding tasks that failed with an unexpected error (a proxy bug; logged).
    internal_errors: int


@dataclass(slots=True)
class _Settings:
    mode: Mode = Mode.PASS
    delay_s: float = 0.0
    bytes_per_s: int = 0
    #: Loop time at which the shared link of this direction is free again (bandwidth pacing).
    link_free_at: float = 0.0
    forwarded_bytes: int = 0
    dropped_bytes: int = 0


class _Reset:
    """Queue item: the source reset its connection (or failed)."""


_RESET: Final = _Reset()
#: A queue item: (due loop time, bytes; b"" is EOF) or the reset marker.
_Item = tuple[float, bytes] | _Reset


@dataclass(eq=False, slots=True)
class _Link:
    """One proxied connection: client side and target side."""

    number: int
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Something (bytes, EOF or a reset) was discarded: the stream can never be whole again.
    broken: bool = False
    #: Directions whose EOF was delivered.
    finished: Direction = _NO_DIRECTION
    ended: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FaultProxy:
    """A fault-injecting TCP proxy in front of ``target`` (``HOST:PORT``); see the module
    docstring. ``listen_port`` 0 picks a free port once (kept until :meth:`close`)."""

    def __init__(
        self, target: str, *, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target {target!r} must be HOST:PORT")
        self.target = target
        self._target_host = host.strip("[]")
        self._target_port = int(port)
        self._listen_host = listen_host
        self.port = listen_port
        self._settings = {d: _Settings() for d in _ONE_WAY}
        self._refusing = False
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._dialling: set[asyncio.Task[None]] = set()
        self._numbers = itertools.count(1)
        self._accepted = self._refused = self._reset = self._unreachable = 0
        self._internal_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._changed: asyncio.Event | None = None

    @property
    def address(self) -> str:
        """Where clients dial the proxy (``HOST:PORT``)."""
        return f"{self._listen_host}:{self.port}"

    # ---- lifecycle (caller's thread) ------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start the loop thread and listen; raises ``OSError`` if the port cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=self._run_loop, name=f"faultproxy-{self.target}", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), loop).result(START_TIMEOUT_S)
        except BaseException:
            self._stop_thread()
            raise
        return self

    def close(self) -> None:
        """Reset every connection, stop listening and end the loop thread. Idempotent."""
        loop = self._loop
        if loop is None or self._thread is None:
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(CLOSE_TIMEOUT_S)
        self._stop_thread()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run_loop(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(CLOSE_TIMEOUT_S)
            if thread.is_alive():
                raise TimeoutError(f"fault proxy loop did not stop within {CLOSE_TIMEOUT_S} s")
        self._loop = None
        self._thread = None

    # ---- controls (any thread) ------------------------------------------------------------

    def set_delay(self, delay_s: float, direction: Direction = Direction.BOTH) -> None:
        """Deliver each chunk ``delay_s`` after it was read (0: no delay)."""
        if delay_s < 0:
            raise ValueError("delay_s must be >= 0")

        def apply() -> None:
            for s in self._chosen(direction):
                s.delay_s = delay_s

        self._control(apply)

    def set_bandwidth(self, bytes_per_s: int, direction: Direction = Direction.BOTH) -> None:
        """At most ``bytes_per_s`` each way over all connections (0: unlimited)."""
        if bytes_per_s < 0:
            raise ValueError("bytes_per_s must be >= 0 (0 = unlimited)")

        def apply() -> None:
            for s in self._chosen(direction):
                s.bytes_per_s = bytes_per_s

        self._control(apply)

    def blackhole(self, direction: Direction = Direction.BOTH) -> None:
        """Discard everything travelling ``direction`` (a partition; see the module
        docstring)."""
        self._control(lambda: self._set_mode(Mode.BLACKHOLE, direction))

    def hold(self, direction: Direction = Direction.BOTH) -> None:
        """Stop reading and delivering ``direction``; lifted, everything held arrives."""
        self._control(lambda: self._set_mode(Mode.HOLD, direction))

    def heal(self, direction: Direction = Direction.BOTH) -> None:
        """Lift a blackhole or hold on ``direction`` (delay, bandwidth and refuse stay).
        Connections a blackhole broke are reset before this returns."""
        self._control(lambda: self._set_mode(Mode.PASS, direction))

    def refuse(self, on: bool = True) -> None:
        """Reset new connections as soon as they are accepted (``on=False``: accept again)."""

        def apply() -> None:
            self._refusing = on

        self._control(apply)

    def cut(self) -> int:
        """Reset every open connection on both sides now; returns how many there were."""
        return self._control(self._cut)

    def pass_through(self) -> None:
        """Every fault off: no delay, no bandwidth limit, no blackhole or hold, accept new
        connections. Connections a blackhole broke are reset before this returns."""

        def apply() -> None:
            self._refusing = False
            for s in self._settings.values():
                s.delay_s = 0.0
                s.bytes_per_s = 0
            self._set_mode(Mode.PASS, Direction.BOTH)

        self._control(apply)

    def stats(self) -> ProxyStats:
        def read() -> ProxyStats:
            to_target = self._settings[Direction.TO_TARGET]
            to_client = self._settings[Direction.TO_CLIENT]
            return ProxyStats(
                accepted=self._accepted,
                refused=self._refused,
                reset=self._reset,
                target_unreachable=self._unreachable,
                open=len(self._links),
                forwarded_to_target_bytes=to_target.forwarded_bytes,
                forwarded_to_client_bytes=to_client.forwarded_bytes,
                dropped_to_target_bytes=to_target.dropped_bytes,
                dropped_to_client_bytes=to_client.dropped_bytes,
                internal_errors=self._internal_errors,
            )

        return self._control(read)

    def _control(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fault proxy is not running; call start() first")
        if threading.current_thread() is self._thread:
            return fn()

        async def run() -> T:
            return fn()

        try:
            return asyncio.run_coroutine_threadsafe(run(), loop).result(CONTROL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"fault proxy for {self.target} did not apply a control within "
                f"{CONTROL_TIMEOUT_S} s (is its loop blocked?)"
            ) from None

    # ---- on the loop ----------------------------------------------------------------------

    def _chosen(self, direction: Direction) -> list[_Settings]:
        return [self._settings[d] for d in _ONE_WAY if d in direction]

    def _set_mode(self, mode: Mode, direction: Direction) -> None:
        lifted_blackhole = False
        for s in self._chosen(direction):
            lifted_blackhole |= s.mode is Mode.BLACKHOLE and mode is not Mode.BLACKHOLE
            s.mode = mode
        if lifted_blackhole:
            self._reset_links(lambda link: link.broken)
        self._wake()

    def _wake(self) -> None:
        changed = self._changed
        self._changed = asyncio.Event()
        if changed is not None:
            changed.set()

    async def _not_held(self, direction: Direction) -> None:
        settings = self._settings[direction]
        while settings.mode is Mode.HOLD:
            changed = self._changed
            assert changed is not None
            await changed.wait()

    def _reset_links(self, which: Callable[[_Link], bool]) -> int:
        chosen = [link for link in self._links if which(link)]
        for link in chosen:
            self._end(link, reset=True)
        self._reset += len(chosen)
        return len(chosen)

    def _cut(self) -> int:
        # A connection still dialling its target is open to its client: it goes too.
        dialling = list(self._dialling)
        for task in dialling:
            task.cancel()
        self._reset += len(dialling)
        return len(dialling) + self._reset_links(lambda link: True)

    async def _listen(self) -> None:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(
            self._accept, self._listen_host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        pending = [t for link in self._links for t in link.tasks] + list(self._handlers)
        self._cut()
        for task in list(self._handlers):
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S / 2)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S / 2):
                    await server.wait_closed()

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(client_reader, client_writer)
        finally:
            self._handlers.discard(task)

    async def _serve(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self._accepted += 1
        if self._refusing or self._server is None:
            self._refused += 1
            _reset(client_writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._dialling.add(task)
        # The target connection as far as it got: a cancel may land after the dial finished
        # but before its result reaches this frame, and it must be reset then too.
        dialled: list[asyncio.StreamWriter] = []
        try:
            target_reader, target_writer = await self._dial(dialled)
        except (OSError, TimeoutError):
            self._unreachable += 1
            _reset(client_writer)
            return
        except asyncio.CancelledError:
            # cut() or close() while the target was being dialled.
            _reset(client_writer)
            for writer in dialled:
                _reset(writer)
            raise
        finally:
            self._dialling.discard(task)
        link = _Link(next(self._numbers), client_writer, target_writer)
        self._links.add(link)
        # From here the link's end decides how the target's side closes (a clean end of the
        # client's side ends it cleanly).
        sock = target_writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
        for direction, source, sink in (
            (Direction.TO_TARGET, client_reader, target_writer),
            (Direction.TO_CLIENT, target_reader, client_writer),
        ):
            queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_CHUNKS)
            link.tasks.append(asyncio.create_task(self._read(direction, source, queue)))
            link.tasks.append(asyncio.create_task(self._deliver(link, direction, queue, sink)))
        for task in link.tasks:
            task.add_done_callback(functools.partial(self._task_done, link))
        try:
            await link.done.wait()
        finally:
            self._end(link, reset=True)

    async def _dial(
        self, dialled: list[asyncio.StreamWriter]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._target_host, self._target_port, type=socket.SOCK_STREAM
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        # Until the link exists, closing this socket (a cut while dialling) must reset the
        # target's side too, not end it cleanly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await loop.sock_connect(sock, address)
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
        dialled.append(writer)
        return reader, writer

    async def _read(
        self, direction: Direction, source: asyncio.StreamReader, queue: asyncio.Queue[_Item]
    ) -> None:
        settings = self._settings[direction]
        loop = asyncio.get_running_loop()
        while True:
            await self._not_held(direction)
            try:
                data = await source.read(CHUNK_BYTES)
            except OSError:
                await queue.put(_RESET)
                return
            await queue.put((loop.time() + settings.delay_s, data))
            if not data:
                return

    async def _deliver(
        self,
        link: _Link,
        direction: Direction,
        queue: asyncio.Queue[_Item],
        sink: asyncio.StreamWriter,
    ) -> None:
        settings = self._settings[direction]
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if not isinstance(item, _Reset):
                wait_s = item[0] - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
            await self._not_held(direction)
            if settings.mode is Mode.BLACKHOLE:
                link.broken = True
                if isinstance(item, _Reset) or not item[1]:
                    return  # the end is swallowed too: the other side stays in the dark
                settings.dropped_bytes += len(item[1])
                continue
            if isinstance(item, _Reset):
                self._end(link, reset=True)
                return
            data = item[1]
            try:
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()
                    self._finished(link, direction)
                    return
                await self._send(link, direction, sink, data)
            except OSError:
                self._end(link, reset=True)
                return

    async def _send(
        self, link: _Link, direction: Direction, sink: asyncio.StreamWriter, data: bytes
    ) -> None:
        """Deliver ``data``, in paced pieces under a bandwidth limit; every piece obeys the
        mode in force when it leaves (a hold or blackhole set meanwhile stops the rest)."""
        settings = self._settings[direction]
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        start = 0
        while start < len(view):
            rate = settings.bytes_per_s
            piece = view[start : start + PACED_PIECE_BYTES] if rate else view[start:]
            if rate:
                now = loop.time()
                begin = max(settings.link_free_at, now)
                settings.link_free_at = begin + len(piece) / rate
                if begin > now:
                    await asyncio.sleep(begin - now)
            await self._not_held(direction)
            if settings.mode is Mode.BLACKHOLE:
                link.broken = True
                settings.dropped_bytes += len(view) - start
                return
            sink.write(piece)
            settings.forwarded_bytes += len(piece)
            start += len(piece)
            await sink.drain()

    def _task_done(self, link: _Link, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the proxy, not a network fault: count it (tests assert on it), log it, and
        # reset the connection rather than leave it hanging.
        self._internal_errors += 1
        log.error(
            "fault proxy for %s: forwarding failed; resetting the connection",
            self.target,
            exc_info=task.exception(),
        )
        self._end(link, reset=True)

    def _finished(self, link: _Link, direction: Direction) -> None:
        link.finished |= direction
        if link.finished == Direction.BOTH:
            self._end(link, reset=False)

    def _end(self, link: _Link, *, reset: bool) -> None:
        if link.ended:
            return
        link.ended = True
        self._links.discard(link)
        current = asyncio.current_task()
        for task in link.tasks:
            if task is not current:
                task.cancel()
        for writer in (link.client, link.target):
            if reset:
                _reset(writer)
            else:
                writer.close()
        link.done.set()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()
