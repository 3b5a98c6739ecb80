"""The degrade decision through a real master: a real ``blockyard master`` on SQLite and two
real ``blockyard serve --master`` servers hold a 2-copy sync_all volume. The replica's server is
stopped (SIGSTOP: no RST, it just stops answering), so the primary must drop it to acknowledge
a flush; qemu-io's flush over iscsi:// returns only once the master has the replica out of sync
in its store (the store shows it the moment the flush returns; GetVolume would say "dead" for
a copy on a server silent that long). Then kill -9 of the primary:
the master must not promote the stale replica (the volume waits for its primary instead of
losing the acknowledged write). And with the master itself stopped, a sync_all primary that
must drop its replica fails the flush with a SCSI error rather than hanging.

Heartbeats run every second here, so that a master learning of the mark only from a heartbeat
(the old, local-only mark) would usually still show the replica in sync when the flush
returns."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_master_process import (
    Proc,
    alive_servers,
    get_volume,
    launch,
    master_call,
    server_volume,
    wait_for,
)

from blockyard.engine.epoch import Role
from blockyard.master.proto import master_pb2 as mpb
from blockyard.server.proto import volume_server_pb2 as vpb

MIB = 1 << 20
LEASE_TTL_S = 2.0
MARGIN_S = 0.5
INTERVAL_S = 1.0
#: qemu-io's own bound: a flush that must degrade takes the barrier timeout (5 s) plus the
#: MarkOutOfSync call; one that cannot may take the primary's 25 s commit wait.
TOOL_TIMEOUT_S = 60.0


def qemu_io(url: str, *commands: str) -> tuple[subprocess.CompletedProcess[str], float]:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    start = time.monotonic()
    done = subprocess.run(
        [*args, url], check=False, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )
    return done, time.monotonic() - start


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[Proc, list[Proc]]]:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not installed: apt-get install qemu-utils qemu-block-extra")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[Proc] = []
    interval = f"{int(INTERVAL_S * 1000)}ms"
    try:
        master = launch(
            [
                "master",
                "--listen",
                "127.0.0.1:0",
                "--store",
                f"sqlite:///{tmp_path}/master.db",
                "--lease-ttl",
                f"{LEASE_TTL_S}s",
                "--heartbeat-interval",
                interval,
            ],
            logs / "master.log",
        )
        procs.append(master)
        assert master.fields, master.log.read_text()
        servers = []
        for i in range(2):
            s = launch(
                [
                    "serve",
                    "--data-dir",
                    str(tmp_path / f"s{i}"),
                    "--api-listen",
                    "127.0.0.1:0",
                    "--iscsi-listen",
                    "127.0.0.1:0",
                    "--replication-listen",
                    "127.0.0.1:0",
                    "--master",
                    master.fields["master"],
                    "--heartbeat-interval",
                    interval,
                ],
                logs / f"serve-{i}.log",
            )
            procs.append(s)
            assert s.fields, s.log.read_text()
            servers.append(s)
        yield master, servers
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGKILL)  # SIGKILL also ends a stopped process


def create_in_sync_volume(master: Proc, servers: list[Proc]) -> tuple[Proc, Proc, str, str]:
    """A 2-copy sync_all volume with both copies in sync: (primary, replica, their server
    ids as a pair joined by '/', the primary's iscsi:// URL)."""
    addr = master.fields["master"]
    wait_for("two alive servers", lambda: len(alive_servers(addr)) == 2)
    apis = alive_servers(addr)
    info: mpb.VolumeInfo = master_call(
        addr,
        lambda s: s.CreateVolume(
            mpb.MasterCreateVolumeRequest(
                name="vol", size_bytes=8 * MIB, replica_count=2, mode=vpb.DURABILITY_MODE_SYNC_ALL
            )
        ),
    )
    primary_id = info.primary_server_id
    [replica_id] = [c.server_id for c in info.copies if c.server_id != primary_id]
    proc_of = {sid: next(s for s in servers if s.fields["api"] == api) for sid, api in apis.items()}
    wait_for(
        "roles applied",
        lambda: (
            server_volume(apis[primary_id], "vol") == (Role.PRIMARY, 1)
            and server_volume(apis[replica_id], "vol") == (Role.REPLICA, 1)
        ),
    )
    wait_for(
        "both copies in sync",
        lambda: {c.state for c in get_volume(addr, "vol").copies} == {"in_sync"},
    )
    iqn = get_volume(addr, "vol").iqn
    assert iqn
    url = f"iscsi://{proc_of[primary_id].fields['iscsi'].split(',')[0]}/{iqn}/0"
    return proc_of[primary_id], proc_of[replica_id], f"{primary_id}/{replica_id}", url


def copy_states(addr: str) -> dict[str, str]:
    """GetVolume's view (a copy on a server silent past the dead window shows "dead")."""
    return {c.server_id: c.state for c in get_volume(addr, "vol").copies}


def stored_states(db: Path) -> dict[str, str]:
    """The copy states in the master's SQLite store, read-only beside the running master."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as c:
        [(value,)] = c.execute(
            "SELECT value FROM records WHERE kind = 'volumes' AND id = 'vol'"
        ).fetchall()
    return {copy["server_id"]: copy["state"] for copy in json.loads(value)["copies"]}


def test_flush_waits_for_the_masters_mark_and_the_stale_replica_is_never_promoted(
    two_servers: tuple[Proc, list[Proc]], tmp_path: Path
) -> None:
    master, servers = two_servers
    addr = master.fields["master"]
    primary, replica, ids, url = create_in_sync_volume(master, servers)
    primary_id, replica_id = ids.split("/")
    done, _ = qemu_io(url, "write -P 0x11 0 64k", "flush")
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout + done.stderr

    replica.process.send_signal(signal.SIGSTOP)
    done, took_s = qemu_io(url, "write -P 0x5a 0 64k", "flush")
    # At once: the master must already hold the mark in its store.
    states = stored_states(tmp_path / "master.db")
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout + done.stderr
    print(f"flush with the replica stopped took {took_s:.2f} s")
    assert states == {primary_id: "in_sync", replica_id: "out_of_sync"}, states
    assert get_volume(addr, "vol").status == "degraded"

    primary.stop(signal.SIGKILL)
    killed = time.monotonic()
    replica.process.send_signal(signal.SIGCONT)  # the stale copy is back and heartbeating
    # Long past the promotion delay (TTL + margin) and the dead-server window.
    wait_s = LEASE_TTL_S + MARGIN_S + 10 * INTERVAL_S
    while time.monotonic() - killed < wait_s:
        info = get_volume(addr, "vol")
        assert (info.epoch, info.primary_server_id) == (1, primary_id), info
        time.sleep(0.2)
    assert copy_states(addr)[replica_id] == "out_of_sync"  # heard again: not "dead"
    assert stored_states(tmp_path / "master.db")[replica_id] == "out_of_sync"
    assert server_volume(replica.fields["api"], "vol") == (Role.REPLICA, 1)


def test_with_the_master_stopped_a_flush_that_must_degrade_fails_with_a_sense(
    two_servers: tuple[Proc, list[Proc]],
) -> None:
    master, servers = two_servers
    _, replica, _, url = create_in_sync_volume(master, servers)
    master.process.send_signal(signal.SIGSTOP)
    replica.process.send_signal(signal.SIGSTOP)
    try:
        done, took_s = qemu_io(url, "write -P 0x5a 0 64k", "flush")
    finally:
        master.process.send_signal(signal.SIGCONT)
    print(f"flush with the master and the replica stopped failed after {took_s:.2f} s")
    # qemu-io reports the failed command (a CHECK CONDITION, not a hang) and exits.
    assert "failed" in done.stdout + done.stderr, done.stdout + done.stderr
    # Within an initiator's SCSI command timeout (30 s in Linux and libiscsi).
    assert took_s < 30.0
    replica.process.send_signal(signal.SIGCONT)
