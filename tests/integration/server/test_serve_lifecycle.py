"""`blockyard serve` start, stop and restart as a real process: adoption of volumes on disk,
bounded SIGTERM with data flushed, failed starts that leave nothing behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serve_helpers import SHUTDOWN_BOUND_S, Serve, need_tools, qemu_io, stop_tool

MIB = 1 << 20


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A TCP port held by a listening socket of this test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_restart_adopts_volumes_and_keeps_flushed_data(
    start_serve: Callable[..., Serve], tmp_path: Path
) -> None:
    need_tools("qemu-io")
    first = start_serve()
    created = first.call(lambda c: c.create_volume("keep", 4 * MIB))
    first.call(lambda c: c.create_snapshot("keep", "s1"))
    written = qemu_io(first.url("keep"), "write -P 0x7e 1M 128k", "flush")
    assert written.returncode == 0, written.stderr
    started = time.monotonic()
    assert first.stop() == 0, first.stderr()
    assert time.monotonic() - started < SHUTDOWN_BOUND_S
    assert "rpc CreateVolume keep OK" in first.stderr()  # one log line per RPC, with duration

    second = start_serve()
    assert second.api, second.stderr()
    adopted = second.call(lambda c: c.get_volume("keep"))
    assert adopted.uuid == created.uuid and adopted.snapshot_count == 1
    assert adopted.export.naa_id == created.export.naa_id
    read = qemu_io(second.url("keep"), "read -P 0x7e 1M 128k")
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout


def test_sigterm_with_a_live_session_exits_zero_within_the_bound(
    start_serve: Callable[..., Serve],
) -> None:
    need_tools("qemu-io")
    serve = start_serve()
    serve.call(lambda c: c.create_volume("busy", 4 * MIB))
    proc = subprocess.Popen(
        ["qemu-io", "-f", "raw", serve.url("busy")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("write -P 0x44 0 64k\nflush\n")
        proc.stdin.flush()
        assert "wrote 65536/65536" in proc.stdout.readline() + proc.stdout.readline()
        started = time.monotonic()
        assert serve.stop(signal.SIGTERM) == 0, serve.stderr()
        assert time.monotonic() - started < SHUTDOWN_BOUND_S
    finally:
        stop_tool(proc)
    again = start_serve(data_dir=serve.data_dir)
    read = qemu_io(again.url("busy"), "read -P 0x44 0 64k")
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout


def test_iscsi_port_in_use_fails_clearly_and_a_later_start_works(
    start_serve: Callable[..., Serve], busy_port: int
) -> None:
    failed = start_serve(iscsi_listen=[f"127.0.0.1:{busy_port}"])
    assert failed.process.wait(timeout=20) == 1
    assert not failed.api
    err = failed.stderr()
    assert f"cannot listen for iSCSI on 127.0.0.1:{busy_port}" in err
    assert "--iscsi-listen" in err
    ok = start_serve(data_dir=failed.data_dir)
    assert ok.api and ok.call(lambda c: c.health()).serving


def test_api_port_in_use_fails_clearly_and_releases_the_data_dir(
    start_serve: Callable[..., Serve], busy_port: int
) -> None:
    first = start_serve()
    first.call(lambda c: c.create_volume("v", 1 * MIB))
    assert first.stop() == 0
    failed = start_serve(data_dir=first.data_dir, api_listen=f"127.0.0.1:{busy_port}")
    assert failed.process.wait(timeout=20) == 1
    assert "cannot listen for the management API" in failed.stderr()
    ok = start_serve(data_dir=first.data_dir)
    assert ok.call(lambda c: c.get_volume("v")).size_bytes == 1 * MIB


def test_second_server_on_the_same_data_dir_is_refused(start_serve: Callable[..., Serve]) -> None:
    first = start_serve()
    second = start_serve(data_dir=first.data_dir)
    assert second.process.wait(timeout=20) == 1
    assert "in use by another blockyard serve" in second.stderr()
    assert first.call(lambda c: c.health()).serving


def test_bad_listen_address_is_a_usage_error(start_serve: Callable[..., Serve]) -> None:
    bad = start_serve(iscsi_listen=["no-port-here"])
    assert bad.process.wait(timeout=20) == 2
    assert "HOST:PORT" in bad.stderr()
