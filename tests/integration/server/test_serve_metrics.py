"""`blockyard serve --metrics-listen`: real servers scraped over HTTP.

One server: the READY line names the endpoint, per-volume LSNs follow writes and flushes made
through iSCSI (qemu-io), a deleted volume's series go away, and a port in use is a clean start
error. Two servers replicating a volume (sync_all): the rebuild's bytes and progress, the
in-sync transition, barrier latencies of flushes, then the replica killed (degrade event,
out_of_sync state, lag in LSNs and bytes) and restarted (caught up, in sync again).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import Serve, need_tools, qemu_io

from blockyard.testing.cluster import LocalCluster, ServerProc, free_port

MIB = 1 << 20
P = "blockyard_server_"
SCRAPE_TIMEOUT_S = 10.0
WAIT_S = 60.0
POLL_S = 0.2

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample the endpoint serves now, keyed by (name, sorted labels)."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(port: int, name: str, **labels: str) -> float | None:
    return scrape(port).get((P + name, tuple(sorted(labels.items()))))


def wait_metric(
    port: int,
    name: str,
    ok: Callable[[float | None], bool],
    *,
    timeout_s: float = WAIT_S,
    **labels: str,
) -> float | None:
    """Poll until ``ok(value)``; fails with the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = metric(port, name, **labels)
        if ok(got):
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{name}{labels} is {got} after {timeout_s} s")
        time.sleep(POLL_S)


def check_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0 and "failed" not in result.stdout + result.stderr, (
        result.stdout,
        result.stderr,
    )


# ---- one server -------------------------------------------------------------------------------


def test_ready_line_names_the_metrics_endpoint(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "blockyard.cli.main", "serve", "--data-dir", str(tmp_path)]
    args += ["--iscsi-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]
    args += ["--metrics-listen", "127.0.0.1:0"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.startswith("READY "), p.stderr.read() if p.stderr else ""
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            url = fields["metrics"]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
            port = int(url.removeprefix("http://127.0.0.1:").removesuffix("/metrics"))
            assert port != 0
            assert metric(port, "data_dir_total_bytes")
        finally:
            p.terminate()
            p.communicate(timeout=30)
        assert p.returncode == 0


def test_volume_series_follow_writes_flushes_and_delete(
    start_serve: Callable[..., Serve],
) -> None:
    need_tools("qemu-io")
    port = free_port()
    serve = start_serve(
        extra_args=("--metrics-listen", f"127.0.0.1:{port}", "--space-soft-threshold", "0")
    )
    assert serve.api, serve.stderr()
    serve.call(lambda c: c.create_volume("m1", 64 * MIB))
    assert metric(port, "volume_last_lsn", volume="m1") == 0
    assert (metric(port, "data_dir_total_bytes") or 0) > 0
    assert (metric(port, "data_dir_free_bytes") or 0) > 0
    assert metric(port, "data_dir_low_space") == 0
    assert metric(port, "data_dir_soft_threshold_bytes") == 0

    check_ok(qemu_io(serve.url("m1"), "write -P 0x11 0 1M", "flush"))
    last = metric(port, "volume_last_lsn", volume="m1")
    assert last is not None and last > 0
    # Flushed: everything written is durable; no replica, so nothing is kept for one.
    assert metric(port, "volume_durable_lsn", volume="m1") == last
    assert metric(port, "volume_wal_retained_bytes", volume="m1") == 0
    assert metric(port, "sample_timeouts_total") == 0

    serve.call(lambda c: c.delete_volume("m1"))
    assert metric(port, "volume_last_lsn", volume="m1") is None


def test_metrics_port_in_use_is_a_clean_start_error(start_serve: Callable[..., Serve]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = start_serve(extra_args=("--metrics-listen", f"127.0.0.1:{port}"))
        assert serve.process.wait(timeout=30) == 1
        assert not serve.api
        assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-listen)" in serve.stderr()
    # Everything was undone: the same data directory serves at once without the conflict.
    again = start_serve(extra_args=("--metrics-listen", f"127.0.0.1:{port}"))
    assert again.api, again.stderr()


# ---- replication ------------------------------------------------------------------------------


def test_replication_metrics_through_rebuild_degrade_and_catch_up(tmp_path: Path) -> None:
    need_tools("qemu-io")
    ports = [free_port(), free_port()]
    cluster = LocalCluster(
        tmp_path,
        [
            ServerProc(
                f"server{i}",
                tmp_path / f"server{i}" / "data",
                tmp_path / "logs",
                extra_args=("--metrics-listen", f"127.0.0.1:{ports[i]}"),
            )
            for i in range(2)
        ],
    )
    cluster.start()
    try:
        _replication_scenario(cluster, ports[0])
    finally:
        cluster.stop()


def _replication_scenario(cluster: LocalCluster, port: int) -> None:
    primary, replica = cluster.servers
    name = "rv"
    desc = primary.call(lambda c: c.create_volume(name, 64 * MIB))
    url = f"iscsi://{primary.portal}/{desc.export.iqn}/0"
    # 4 MiB of data before the replica exists: its rebuild has to send exactly that.
    check_ok(qemu_io(url, "write -P 0x22 0 4M", "flush"))
    cluster.replicate(name, 64 * MIB)
    cluster.wait_in_sync(name)
    r = replica.replication_address
    labels = {"volume": name, "replica": r}

    wait_metric(port, "replica_state", lambda v: v == 1, state="in_sync", **labels)
    assert metric(port, "replica_state", state="out_of_sync", **labels) == 0
    assert metric(port, "replica_in_sync_transitions_total", **labels) == 1
    assert metric(port, "replica_degrade_events_total", **labels) is None
    assert metric(port, "replica_resync_bytes_total", **labels) == 4 * MIB
    assert metric(port, "replica_resync_progress_ratio", **labels) == 1.0

    before = metric(port, "barrier_latency_seconds_count", volume=name) or 0
    check_ok(qemu_io(url, "write -P 0x33 4M 1M", "flush"))
    after = metric(port, "barrier_latency_seconds_count", volume=name) or 0
    assert after >= before + 1
    wait_metric(port, "replica_lag_lsns", lambda v: v == 0, **labels)
    assert metric(port, "replica_lag_bytes", **labels) == 0

    replica.kill()
    check_ok(qemu_io(url, "write -P 0x44 5M 1M", "flush"))
    wait_metric(port, "replica_state", lambda v: v == 1, state="out_of_sync", **labels)
    assert metric(port, "replica_degrade_events_total", **labels) == 1
    lag = metric(port, "replica_lag_lsns", **labels)
    assert lag is not None and lag > 0
    # The records it missed are still in the primary's WAL (well within the retention bounds).
    assert (metric(port, "replica_lag_bytes", **labels) or 0) >= 1 * MIB

    replica.start()
    cluster.wait_in_sync(name)
    wait_metric(port, "replica_state", lambda v: v == 1, state="in_sync", **labels)
    assert metric(port, "replica_in_sync_transitions_total", **labels) == 2
    assert metric(port, "replica_degrade_events_total", **labels) == 1
    wait_metric(port, "replica_lag_lsns", lambda v: v == 0, **labels)
    assert cluster.checksum(name, 0)[0] == cluster.checksum(name, 1)[0]
