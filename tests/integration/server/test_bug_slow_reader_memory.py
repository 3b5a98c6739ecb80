"""Regression: initiators that queue big READs and never read the answers grew the server
without bound, and the memory stayed after they left.

Fifteen connections that queued 8 MiB READs and never read grew `blockyard serve` by 368 MiB
(in this test's harsher form, with tiny receive buffers and 16 READs each: by gigabytes),
despite a 4 MiB write-buffer high-water mark, which paused reading only after every READ in the
CmdSN window had been answered into the buffer; and RSS stayed about 100 MiB up after they
closed (glibc kept the freed blocks in the heap).

Now a connection takes a new command only while its output in flight is under its mark
(4 MiB), and above the server-wide budget (64 MiB) only while it holds less than 256 KiB; and
once the buffered output has dropped, the server hands the freed memory back (malloc_trim).
Measured on a real server's VmRSS: growth stays under the bound those limits give, a normal
reader keeps working meanwhile, and RSS comes back down when the slow readers close.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from hostile_helpers import RawSession, login, receive_pdu, rss_bytes
from serve_helpers import Serve

from blockyard.iscsi.pdu import DataIn, ScsiCommand, ScsiResponse, encode_pdu
from blockyard.server.iscsi_limits import (
    CONNECTION_OUTPUT_FLOOR_BYTES,
    SERVER_OUTPUT_BYTES_MAX,
)

MIB = 1 << 20
SLOW_READERS = 15
READS_EACH = 16
READ_BLOCKS = 16384  # 8 MiB, the largest transfer the engine takes (engine/limits.py)
READ_BYTES = READ_BLOCKS * 512
#: What the limits allow: the server-wide budget, plus per connection one command past it and
#: the floor every connection keeps (docs/ARCHITECTURE.md, "Connection and memory bounds").
BOUND_BYTES = SERVER_OUTPUT_BYTES_MAX + SLOW_READERS * (READ_BYTES + CONNECTION_OUTPUT_FLOOR_BYTES)
#: Allocator and interpreter noise on top (measured growth is about 110 MiB).
SLACK_BYTES = 48 * MIB
#: RSS after the slow readers left, over the baseline taken before they came.
RELEASED_SLACK_BYTES = 32 * MIB
HOLD_S = 3.0
NORMAL_READ_TIMEOUT_S = 30.0
RELEASE_TIMEOUT_S = 10.0


def clear_unit_attention(session: RawSession) -> None:
    for _ in range(2):
        cmd = ScsiCommand(itt=next(session.itts), cdb=bytes(16), cmd_sn=session.cmd_sn)
        session.cmd_sn += 1
        session.sock.sendall(encode_pdu(cmd))
        response = receive_pdu(session.sock, session.reader)
        assert isinstance(response, ScsiResponse)
        if response.status == 0:
            return
    raise AssertionError("TEST UNIT READY kept failing")


def normal_reads(session: RawSession, count: int) -> None:
    """``count`` pipelined 8 MiB READs, every answer read in full."""
    session.sock.sendall(b"".join(session.read10_bytes(0, READ_BLOCKS) for _ in range(count)))
    done = received = 0
    while done < count:
        pdu = session.next_answer()
        assert isinstance(pdu, DataIn), pdu
        received += len(pdu.data)
        done += pdu.status_present
    assert received == count * READ_BYTES


def test_slow_readers_stay_bounded_and_their_memory_comes_back(
    start_serve: Callable[..., Serve],
) -> None:
    serve = start_serve()
    assert serve.api, serve.stderr()
    target = serve.call(lambda c: c.create_volume("slow", 64 * MIB)).export.iqn
    portal = serve.iscsi[0]
    pid = serve.process.pid
    normal = login(portal, target)
    slow: list[RawSession] = []
    try:
        clear_unit_attention(normal)
        normal_reads(normal, 4)  # warm up: code paths, buffers, one big answer
        baseline = rss_bytes(pid)
        for _ in range(SLOW_READERS):
            session = login(portal, target, rcvbuf_bytes=4096)
            slow.append(session)
            clear_unit_attention(session)
            burst = b"".join(session.read10_bytes(0, READ_BLOCKS) for _ in range(READS_EACH))
            session.sock.sendall(burst)
        peak = 0
        deadline = time.monotonic() + HOLD_S
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(pid) - baseline)
            time.sleep(0.1)
        # A reader that reads keeps being served while the slow ones hold their share.
        started = time.monotonic()
        normal_reads(normal, 8)
        assert time.monotonic() - started < NORMAL_READ_TIMEOUT_S
        peak = max(peak, rss_bytes(pid) - baseline)
        assert peak < BOUND_BYTES + SLACK_BYTES, f"grew {peak / MIB:.0f} MiB"
    finally:
        for session in slow:
            session.close()
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while (after := rss_bytes(pid) - baseline) > RELEASED_SLACK_BYTES:
        assert time.monotonic() < deadline, (
            f"RSS still {after / MIB:.0f} MiB over the baseline after the slow readers left "
            f"(peak {peak / MIB:.0f} MiB)"
        )
        time.sleep(0.1)
    normal_reads(normal, 1)
    normal.close()
    log = serve.stderr()
    assert "Traceback" not in log, log
