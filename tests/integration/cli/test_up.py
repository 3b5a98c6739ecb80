"""`blockyard up` / `blockyard down` and `blockyard attach NAME --master` with real processes.

up starts a real master and real volume servers; the tests read DIR/cluster.env (the CLI
contract: MASTER=, SERVER_<i>_ID=, SERVER_<i>_API=, SERVER_<i>_PID=), check it against what the
master lists, kill -9 a server (up reaps it and leaves it down), restart it with
--restart-server, and check that down (and SIGTERM) stop everything in bounded time and leave
no process. The attach test (root, FUSE, loop) attaches a 2-copy sync_all volume through the
master with every copy's portal, kills the primary's server, and reads back every acknowledged
write through the same device after the failover.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockyard.cli.up_layout import ServerEntry, env_text, read_env

#: Generous bounds for a shared 2-core machine; the assertions themselves are exact.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
WAIT_S = 60.0
CLI_TIMEOUT_S = 120.0
MIB = 1 << 20
_ADDR = re.compile(r"^127\.0\.0\.1:\d{1,5}$")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "blockyard.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"{args}: rc {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def running(pid: int) -> bool:
    """Alive and not a zombie (a reaped or never-reaped child both count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except FileNotFoundError:
            continue
        for k in map(int, kids):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


@dataclass
class Up:
    process: subprocess.Popen[str]
    dir: Path
    log: Path

    @property
    def env_path(self) -> Path:
        return self.dir / "cluster.env"

    def env(self) -> dict[str, str]:
        return read_env(self.env_path)


def start_up(tmp_path: Path, servers: int) -> Up:
    directory = tmp_path / "c"
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blockyard.cli.main", "up", "--servers", str(servers),
             "--dir", str(directory)],
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    up = Up(proc, directory, log)

    def ready() -> bool:
        assert proc.poll() is None, f"up exited {proc.returncode}:\n{log.read_text()}"
        return up.env_path.exists()

    wait_for("cluster.env", ready, START_TIMEOUT_S)
    return up


@pytest.fixture
def up_factory(tmp_path: Path) -> Iterator[Callable[[int], Up]]:
    made: list[Up] = []

    def make(servers: int) -> Up:
        made.append(start_up(tmp_path, servers))
        return made[-1]

    yield make
    for up in made:  # a failed test still leaves no process behind
        pids = descendants(up.process.pid)
        if up.process.poll() is None:
            up.process.send_signal(signal.SIGTERM)
            try:
                up.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                up.process.kill()
                up.process.wait(timeout=STOP_TIMEOUT_S)
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def servers_json(master: str) -> list[dict[str, object]]:
    got = json.loads(cli("servers", "--master", master, "-o", "json").stdout)
    assert isinstance(got, list)
    return got


def state_of(master: str, server_id: str) -> object:
    return {s["server_id"]: s["state"] for s in servers_json(master)}.get(server_id)


def test_up_writes_cluster_env_restarts_a_killed_server_and_down_leaves_nothing(
    up_factory: Callable[[int], Up],
) -> None:
    up = up_factory(3)
    env = up.env()
    master = env["MASTER"]
    assert _ADDR.match(master), env
    assert env["SERVERS"] == "3" and int(env["UP_PID"]) == up.process.pid
    ids, apis, pids = {}, {}, {}
    for i in (1, 2, 3):
        ids[i], apis[i], pids[i] = (
            env[f"SERVER_{i}_ID"],
            env[f"SERVER_{i}_API"],
            int(env[f"SERVER_{i}_PID"]),
        )
        assert _ADDR.match(apis[i]) and ids[i], env
        assert running(pids[i]) and pids[i] in descendants(up.process.pid)
        assert b"serve" in Path(f"/proc/{pids[i]}/cmdline").read_bytes()
    listed = {s["server_id"]: s for s in servers_json(master)}
    assert set(listed) == set(ids.values())
    for i in (1, 2, 3):
        assert listed[ids[i]]["api"] == apis[i] and listed[ids[i]]["state"] == "alive"

    # A second up on the same directory refuses.
    second = cli("up", "--servers", "3", "--dir", str(up.dir), check=False)
    assert second.returncode == 1 and "already runs" in second.stderr, second

    # kill -9 server 2: up reaps it and leaves it down, the others keep running.
    os.kill(pids[2], signal.SIGKILL)
    wait_for("server 2 reaped", lambda: not running(pids[2]))
    wait_for("server 2 dead in the master", lambda: state_of(master, ids[2]) != "alive")
    assert "server 2" in up.log.read_text() and "signal 9" in up.log.read_text()
    assert running(pids[1]) and running(pids[3])

    # Restarting a running server is refused; restarting the killed one brings it back with its
    # id (its data directory) and API address.
    refused = cli("up", "--dir", str(up.dir), "--restart-server", "1", check=False)
    assert refused.returncode == 1 and "is running" in refused.stderr, refused
    out = cli("up", "--dir", str(up.dir), "--restart-server", "2").stdout
    new_pid = int(up.env()["SERVER_2_PID"])
    assert out.strip() == f"ok pid={new_pid}" and new_pid != pids[2] and running(new_pid)
    wait_for("server 2 alive again with its id", lambda: state_of(master, ids[2]) == "alive")
    assert up.env()["SERVER_2_API"] == apis[2] and up.env()["SERVER_2_ID"] == ids[2]

    everything = descendants(up.process.pid) | {up.process.pid}
    assert len(everything) == 4 + 1  # master, three servers, up itself
    started = time.monotonic()
    done = cli("down", "--dir", str(up.dir))
    assert done.stdout.strip() == "ok stopped"
    assert up.process.wait(timeout=STOP_TIMEOUT_S) == 0
    assert time.monotonic() - started < STOP_TIMEOUT_S
    assert [p for p in everything if running(p)] == []
    assert not up.env_path.exists() and not (up.dir / "up.sock").exists()
    # down again: nothing runs, nothing to do.
    again = cli("down", "--dir", str(up.dir))
    assert "nothing to stop" in again.stdout, again


def test_sigterm_to_up_stops_every_process(up_factory: Callable[[int], Up]) -> None:
    up = up_factory(1)
    everything = descendants(up.process.pid)
    assert len(everything) == 2 and int(up.env()["SERVER_1_PID"]) in everything
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=STOP_TIMEOUT_S) == 0
    assert [p for p in everything if running(p)] == []
    assert not up.env_path.exists()


def test_down_after_up_was_killed_stops_the_orphans(up_factory: Callable[[int], Up]) -> None:
    up = up_factory(1)
    env = up.env()
    orphans = {int(env["MASTER_PID"]), int(env["SERVER_1_PID"])}
    assert orphans == descendants(up.process.pid)
    up.process.kill()  # its children run in their own sessions: they outlive it
    up.process.wait(timeout=STOP_TIMEOUT_S)
    assert all(running(p) for p in orphans)
    done = cli("down", "--dir", str(up.dir))
    assert "stopped 2 leftover processes" in done.stdout, done
    wait_for("the orphans gone", lambda: not any(running(p) for p in orphans))
    assert not up.env_path.exists()


def test_down_without_a_cluster_says_how_to_start_one(tmp_path: Path) -> None:
    done = cli("down", "--dir", str(tmp_path / "none"), check=False)
    assert done.returncode == 1 and "blockyard up --dir" in done.stderr, done


# ---- attach --master ----------------------------------------------------------------------------


def _attach_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices)"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "needs /dev/fuse and /dev/loop-control"
    if shutil.which("losetup") is None or shutil.which("fusermount3") is None:
        return "needs losetup and fusermount3"
    return None


def _pattern(i: int) -> bytes:
    return bytes([i % 251 + 1]) * MIB


def _direct_io(device: str, offset: int, data: bytes | None) -> bytes:
    """One O_DIRECT write (then fsync: SYNCHRONIZE CACHE to the target) or read of 1 MiB."""
    buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT wants
    fd = os.open(device, (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT)
    try:
        if data is not None:
            buf.write(data)
            assert os.pwritev(fd, [buf], offset) == MIB
            os.fsync(fd)
            return data
        assert os.preadv(fd, [buf], offset) == MIB
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


@pytest.mark.skipif(_attach_missing() is not None, reason=_attach_missing() or "")
def test_attach_master_uses_every_copy_and_follows_a_failover(
    up_factory: Callable[[int], Up], tmp_path: Path
) -> None:
    up = up_factory(2)
    env = up.env()
    master = env["MASTER"]
    state = str(tmp_path / "attach-state")
    cli("volume", "create", "av", "--size", "64MiB", "--replicas", "2",
        "--durability", "sync_all", "--master", master)  # fmt: skip

    def doc() -> dict[str, object]:
        got = json.loads(cli("volume", "get", "av", "--master", master, "-o", "json").stdout)
        assert isinstance(got, dict)
        return got

    def in_sync() -> bool:
        d = doc()
        reps = d["replicas"]
        assert isinstance(reps, list)
        return d["status"] == "active" and [r["state"] for r in reps] == ["in_sync"]

    wait_for("the replica in sync", in_sync)
    d = doc()
    primary, replica = d["primary"], d["replicas"][0]  # type: ignore[index]
    assert isinstance(primary, dict) and isinstance(replica, dict)
    attached = json.loads(
        cli("attach", "av", "--master", master, "--state-dir", state, "--json").stdout
    )
    device = attached["device"]
    try:
        listing = json.loads(cli("attachments", "--state-dir", state, "--json").stdout)
        assert [a["portals"] for a in listing] == [
            primary["iscsi_portals"] + replica["iscsi_portals"]
        ]
        assert listing[0]["iqn"] == d["iqn"]
        for i in range(4):
            _direct_io(device, i * MIB, _pattern(i))

        index = next(i for i in (1, 2) if env[f"SERVER_{i}_ID"] == primary["server_id"])
        os.kill(int(env[f"SERVER_{index}_PID"]), signal.SIGKILL)
        for i in range(4, 8):  # each waits through the failover; none may fail
            _direct_io(device, i * MIB, _pattern(i))
        after = doc()
        assert after["primary"]["server_id"] == replica["server_id"]  # type: ignore[index]
        assert int(after["epoch"]) > int(d["epoch"])  # type: ignore[call-overload]
        for i in range(8):
            assert _direct_io(device, i * MIB, None) == _pattern(i), f"MiB {i}"
    finally:
        cli("detach", "av", "--state-dir", state, "--force")


def test_cluster_env_is_shell_syntax_that_bash_sources(tmp_path: Path) -> None:
    odd = str(tmp_path / "a dir with $HOME, 'quotes' and spaces")
    entries = [ServerEntry(1, "id1", "127.0.0.1:7001", "127.0.0.1:3261", "127.0.0.1:7501", odd, 42)]
    path = tmp_path / "cluster.env"
    path.write_text(env_text("127.0.0.1:9333", 7, 8, entries))
    names = ["MASTER", "MASTER_PID", "UP_PID", "SERVERS", "SERVER_1_ID", "SERVER_1_API",
             "SERVER_1_PID", "SERVER_1_DATA_DIR"]  # fmt: skip
    script = f". {shlex.quote(str(path))}; " + "; ".join(f'printf "%s\\0" "${n}"' for n in names)
    sourced = subprocess.run(["bash", "-c", script], capture_output=True, check=True).stdout
    assert sourced.decode().split("\0")[:-1] == [
        "127.0.0.1:9333", "7", "8", "1", "id1", "127.0.0.1:7001", "42", odd
    ]  # fmt: skip
    assert [read_env(path)[n] for n in names] == sourced.decode().split("\0")[:-1]
