"""The master with real processes: a real ``blockyard master`` on an SQLite store and three
real ``blockyard serve --master`` volume servers. A 2-replica volume is created through the
master; both copies take their roles at epoch 1; kill -9 of the primary's server gets the
replica promoted at epoch 2 within the lease TTL + margin + a few heartbeats. Also: SIGTERM
stops the master in bounded time, and a second master on the same store refuses to start."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from blockyard.engine.epoch import Role
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.proto import master_pb2_grpc as mgrpc
from blockyard.server.client import VolumeServerClient
from blockyard.server.proto import volume_server_pb2 as vpb

T = TypeVar("T")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
WAIT_S = 60.0
LEASE_TTL_S = 2.0
MARGIN_S = 0.5
INTERVAL_S = 0.2
MIB = 1 << 20


@dataclass
class Proc:
    process: subprocess.Popen[str]
    fields: dict[str, str]
    log: Path
    args: list[str]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
            if self.process.stdout is not None:
                self.process.stdout.close()


def launch(args: list[str], log: Path) -> Proc:
    cmd = [sys.executable, "-m", "blockyard.cli.main", "--log-level", "INFO", *args]
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    out = Proc(proc, {}, log, args)
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty as exc:
        out.stop(signal.SIGKILL)
        raise AssertionError(f"{args[0]} printed nothing:\n{log.read_text()}") from exc
    if line.startswith("READY "):
        out.fields = dict(part.split("=", 1) for part in line.split()[1:])
    return out


def master_call(address: str, fn: Callable[[mgrpc.MasterStub], object]) -> T:  # type: ignore[type-var]
    async def main() -> T:
        async with grpc.aio.insecure_channel(address) as channel:
            return await fn(mgrpc.MasterStub(channel))  # type: ignore[misc,no-any-return]

    return asyncio.run(main())


def server_volume(api: str, name: str) -> tuple[Role, int]:
    async def main() -> tuple[Role, int]:
        async with VolumeServerClient(api, timeout_s=10.0) as c:
            d = await c.get_volume(name)
            return d.role, d.epoch

    return asyncio.run(main())


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Proc, list[Proc]]]:
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[Proc] = []
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
                f"{int(INTERVAL_S * 1000)}ms",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            logs / "master.log",
        )
        procs.append(master)
        assert master.fields, master.log.read_text()
        servers = []
        for i in range(3):
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
                    f"{int(INTERVAL_S * 1000)}ms",
                ],
                logs / f"serve-{i}.log",
            )
            procs.append(s)
            assert s.fields, s.log.read_text()
            servers.append(s)
        yield master, servers
        procs += servers[3:]  # restarted ones (servers and masters)
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGKILL)


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def alive_servers(master: str) -> dict[str, str]:
    """server id → API address of every alive server."""
    resp: mpb.ListServersResponse = master_call(
        master, lambda s: s.ListServers(mpb.ListServersRequest())
    )
    return {x.server_id: x.addresses.api for x in resp.servers if x.state == "alive"}


def get_volume(master: str, name: str) -> mpb.VolumeInfo:
    return master_call(master, lambda s: s.GetVolume(mpb.MasterGetVolumeRequest(name=name)))  # type: ignore[no-any-return]


def test_create_through_the_master_and_fail_over_on_kill_9(
    cluster: tuple[Proc, list[Proc]],
) -> None:
    master, servers = cluster
    addr = master.fields["master"]
    wait_for("three alive servers", lambda: len(alive_servers(addr)) == 3)
    apis = alive_servers(addr)
    proc_of = {sid: next(s for s in servers if s.fields["api"] == api) for sid, api in apis.items()}

    info: mpb.VolumeInfo = master_call(
        addr,
        lambda s: s.CreateVolume(
            mpb.MasterCreateVolumeRequest(
                name="vol",
                size_bytes=8 * MIB,
                replica_count=2,
                mode=vpb.DURABILITY_MODE_SYNC_ALL,
            )
        ),
    )
    assert (info.epoch, info.replica_count, len(info.copies)) == (1, 2, 2)
    primary = info.primary_server_id
    [replica] = [c.server_id for c in info.copies if c.server_id != primary]
    assert [c.role for c in info.copies] == [vpb.ROLE_PRIMARY, vpb.ROLE_REPLICA]
    assert info.copies[0].server_id == primary

    # Both servers take their assignment, and the primary's replica comes in sync.
    wait_for(
        "roles applied on the servers",
        lambda: (
            server_volume(apis[primary], "vol") == (Role.PRIMARY, 1)
            and server_volume(apis[replica], "vol") == (Role.REPLICA, 1)
        ),
    )
    wait_for("the volume active", lambda: get_volume(addr, "vol").status == "active")
    # The master does not promote anything while the primary heartbeats.
    time.sleep(LEASE_TTL_S + MARGIN_S + 2 * INTERVAL_S)
    assert (get_volume(addr, "vol").epoch, get_volume(addr, "vol").primary_server_id) == (
        1,
        primary,
    )

    proc_of[primary].stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for("the replica promoted", lambda: get_volume(addr, "vol").epoch == 2)
    promoted_after_s = time.monotonic() - killed
    after = get_volume(addr, "vol")
    assert after.primary_server_id == replica
    assert {c.server_id: c.role for c in after.copies} == {
        replica: vpb.ROLE_PRIMARY,
        primary: vpb.ROLE_REPLICA,
    }
    # Lease TTL + margin after the last grant, plus the suspect window and ticks; the slack
    # covers a loaded 2-core machine (a late promotion is slow, never wrong).
    assert promoted_after_s >= LEASE_TTL_S + MARGIN_S - INTERVAL_S
    assert promoted_after_s < LEASE_TTL_S + MARGIN_S + 10 * INTERVAL_S + 3.0
    wait_for(
        "the new primary applied epoch 2",
        lambda: server_volume(apis[replica], "vol") == (Role.PRIMARY, 2),
    )
    print(f"promoted {promoted_after_s:.2f} s after kill -9")
    wait_for(
        "the failover counted in the metrics",
        lambda: scrape(master.fields["metrics"]).get("blockyard_master_failovers_total") == 1.0,
    )
    metrics = scrape(master.fields["metrics"])
    assert metrics["blockyard_master_is_leader"] == 1.0
    assert metrics['blockyard_master_servers{state="alive"}'] == 2.0

    # The killed server returns on the same data directory: it is fenced by the epoch, takes
    # the replica role at epoch 2, and its copy is caught up until the volume is active again.
    old = proc_of[primary]
    args = list(old.args)
    args[args.index("--api-listen") + 1] = old.fields["api"]
    back = launch(args, old.log.with_name("serve-back.log"))
    servers.append(back)
    assert back.fields, back.log.read_text()
    wait_for(
        "the old primary back as a replica at epoch 2",
        lambda: server_volume(apis[primary], "vol") == (Role.REPLICA, 2),
    )
    wait_for("the volume active again", lambda: get_volume(addr, "vol").status == "active")
    states = {c.server_id: c.state for c in get_volume(addr, "vol").copies}
    assert states == {replica: "in_sync", primary: "in_sync"}


def test_sigterm_is_bounded_and_a_second_master_on_the_store_refuses(tmp_path: Path) -> None:
    args = ["master", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/m.db"]
    first = launch(args, tmp_path / "m1.log")
    try:
        assert first.fields.get("role") == "leader", first.log.read_text()
        second = launch(args, tmp_path / "m2.log")
        assert second.process.wait(timeout=STOP_TIMEOUT_S) == 1
        second.stop()
        assert "in use by another master" in (tmp_path / "m2.log").read_text()
        start = time.monotonic()
        assert first.stop(signal.SIGTERM) == 0
        assert time.monotonic() - start < 12.0
    finally:
        first.stop(signal.SIGKILL)
    again = launch(args, tmp_path / "m3.log")
    try:
        assert again.fields.get("role") == "leader", again.log.read_text()
    finally:
        assert again.stop(signal.SIGTERM) == 0


def test_master_kill_9_and_restart_promotes_nothing(
    cluster: tuple[Proc, list[Proc]],
) -> None:
    """The master is not in the data path: killed for longer than a lease, the primary keeps
    its role (replica lease), and the restarted master, which cannot see the old grants, holds
    promotions for TTL + margin and then finds the primary heartbeating: nothing moves."""
    master, servers = cluster
    addr = master.fields["master"]
    wait_for("three alive servers", lambda: len(alive_servers(addr)) == 3)
    apis = alive_servers(addr)
    info: mpb.VolumeInfo = master_call(
        addr,
        lambda s: s.CreateVolume(
            mpb.MasterCreateVolumeRequest(name="vol", size_bytes=8 * MIB, replica_count=2)
        ),
    )
    primary = info.primary_server_id
    wait_for("the volume active", lambda: get_volume(addr, "vol").status == "active")
    wait_for(
        "primary role applied", lambda: server_volume(apis[primary], "vol") == (Role.PRIMARY, 1)
    )

    master.stop(signal.SIGKILL)
    time.sleep(2 * (LEASE_TTL_S + MARGIN_S))
    assert server_volume(apis[primary], "vol") == (Role.PRIMARY, 1)

    args = list(master.args)
    args[args.index("--listen") + 1] = addr
    again = launch(args, master.log.with_name("master-2.log"))
    servers.append(again)
    assert again.fields.get("role") == "leader", again.log.read_text()
    leader: mpb.LeaderInfo = master_call(addr, lambda s: s.GetLeader(mpb.GetLeaderRequest()))
    assert leader.is_leader and not leader.promotions_allowed
    wait_for(
        "promotions allowed",
        lambda: master_call(addr, lambda s: s.GetLeader(mpb.GetLeaderRequest())).promotions_allowed,
    )
    time.sleep(LEASE_TTL_S + MARGIN_S)
    after = get_volume(addr, "vol")
    assert (after.epoch, after.primary_server_id) == (1, primary)
    assert server_volume(apis[primary], "vol") == (Role.PRIMARY, 1)


def test_failed_start_leaves_nothing_behind(tmp_path: Path) -> None:
    """A master that cannot bind its address exits 1 saying so, and releases the store: the
    next start on the same store works."""
    import socket  # noqa: PLC0415

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = f"sqlite:///{tmp_path}/m.db"
        bad = launch(
            ["master", "--listen", f"127.0.0.1:{port}", "--store", store], tmp_path / "1.log"
        )
        assert bad.process.wait(timeout=STOP_TIMEOUT_S) == 1
        bad.stop()
        assert "cannot listen on" in (tmp_path / "1.log").read_text()
    good = launch(["master", "--listen", "127.0.0.1:0", "--store", store], tmp_path / "2.log")
    try:
        assert good.fields.get("role") == "leader", (tmp_path / "2.log").read_text()
    finally:
        assert good.stop(signal.SIGTERM) == 0
