"""``blockyard up`` / ``blockyard down``: an all-in-one cluster on this machine.

``up`` starts a master (SQLite store in DIR) and N volume servers (``serve --master``, each with
its own data directory and loopback ports), waits until the master sees every server alive,
writes ``DIR/cluster.env`` and stays in the foreground until ``blockyard down --dir DIR``,
Ctrl-C or SIGTERM. It restarts nothing by itself: a killed server stays dead (that is how the
failover demo kills a primary) until ``blockyard up --dir DIR --restart-server I`` starts it
again on its old data directory and ports. Stopping sends SIGTERM to every process and SIGKILL
to what has not exited within ``STOP_TIMEOUT_S``, so it is bounded and leaves no process.

Not started: a CSI driver. ``blockyard csi`` has no master backend yet; the cluster is used
through ``blockyard volume ... --master``, ``blockyard attach NAME --master`` and
``blockyard status --master``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from blockyard.cli.up_layout import (
    CLUSTER_ENV,
    HOST,
    SERVERS_MAX,
    Layout,
    ServerEntry,
    env_text,
    load_layout,
    load_or_make_layout,
    read_env,
    socket_path,
    write_atomically,
)
from blockyard.errors import (
    AlreadyExistsError,
    BlockyardError,
    BlockyardTimeoutError,
    InvalidArgumentError,
    ServerUnavailableError,
)

DEFAULT_DIR: Final = "/var/tmp/blockyard-cluster"
DEFAULT_SERVERS: Final = 3
#: A process must print its READY line within this (a cold Python start on a busy 2-core box
#: takes seconds).
START_TIMEOUT_S: Final = 60.0
#: After SIGTERM a process gets this long before SIGKILL. Volume servers are told to finish
#: their own graceful stop sooner (SERVE_SHUTDOWN_S), so SIGKILL is the exception.
STOP_TIMEOUT_S: Final = 15.0
SERVE_SHUTDOWN_S: Final = 10.0
#: The master must list every server alive within this after they all printed READY.
REGISTER_TIMEOUT_S: Final = 30.0
#: How often the supervisor looks for exited children (and reaps them: a kill -9'd server must
#: not linger as a zombie that `kill -0` still finds).
POLL_INTERVAL_S: Final = 0.2
#: Bound on one control request line and on a control reply wait.
CONTROL_LINE_MAX_BYTES: Final = 256
CONTROL_TIMEOUT_S: Final = START_TIMEOUT_S + 2 * STOP_TIMEOUT_S + 10.0


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "up",
        help="start an all-in-one cluster here: a master and N volume servers",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--servers", type=int, default=DEFAULT_SERVERS, metavar="N",
                   help=f"volume servers to start (default {DEFAULT_SERVERS})")  # fmt: skip
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
    p.add_argument("--restart-server", type=int, metavar="I",
                   help="start volume server I (1..N) of the running cluster again, on its old "
                   "data directory and ports, and exit")  # fmt: skip
    p.set_defaults(func=run_up)

    p = verbs.add_parser("down", help="stop the cluster `blockyard up` runs in --dir")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"cluster directory (default {DEFAULT_DIR})")
    p.set_defaults(func=run_down)


def say(text: str) -> None:
    print(text, flush=True)


# ---- processes ---------------------------------------------------------------------------------


@dataclass
class Child:
    """One process of the cluster: its argv and logs; ``proc`` is None once it was reaped."""

    label: str
    argv: list[str]
    out: Path
    err: Path
    proc: subprocess.Popen[bytes] | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def spawn(self) -> None:
        cmd = [sys.executable, "-m", "blockyard.cli.main", "--log-level", "INFO", *self.argv]
        with self.out.open("wb") as out, self.err.open("ab") as err:
            # Its own session: Ctrl-C in the terminal reaches `up` only, which then stops the
            # servers before the master (they flush their volumes while the master still runs).
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
        self.fields = {}

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the READY line is in its stdout; raises if it exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.out.read_text(errors="replace") if self.out.exists() else ""
            for line in text.splitlines():
                if line.startswith("READY "):
                    self.fields = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
                    return
            if not self.alive():
                raise ServerUnavailableError(
                    f"{self.label} exited before it was ready: {self._tail()}; see {self.err}"
                )
            if time.monotonic() > deadline:
                raise BlockyardTimeoutError(
                    f"{self.label} printed no READY line within {timeout_s:.0f} s; see {self.err}"
                )
            await asyncio.sleep(POLL_INTERVAL_S)

    def _tail(self) -> str:
        lines = (
            self.err.read_text(errors="replace").strip().splitlines() if self.err.exists() else []
        )
        return lines[-1] if lines else "no output"


async def stop_children(children: list[Child]) -> None:
    """SIGTERM to all, SIGKILL to what is left after STOP_TIMEOUT_S; reaps every one."""
    live = [c for c in children if c.alive()]
    for c in live:
        assert c.proc is not None
        with contextlib.suppress(ProcessLookupError):
            c.proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(c.alive() for c in live) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_INTERVAL_S)
    for c in live:
        if c.alive():
            assert c.proc is not None
            say(f"  {c.label} (pid {c.pid}) did not stop within {STOP_TIMEOUT_S:.0f} s: SIGKILL")
            c.proc.kill()
            await asyncio.to_thread(c.proc.wait, STOP_TIMEOUT_S)


# ---- the supervisor ----------------------------------------------------------------------------


class Cluster:
    def __init__(self, directory: Path, layout: Layout) -> None:
        self.dir = directory
        self.layout = layout
        logs = directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.master = Child(
            "master",
            ["master", "--listen", layout.master, "--store", f"sqlite:///{directory}/master.db"],
            logs / "master.out",
            logs / "master.log",
        )
        self.servers: list[Child] = []
        for i, ports in enumerate(layout.servers, start=1):
            argv = [
                "serve", "--data-dir", str(directory / f"server-{i}"),
                "--iscsi-listen", f"{HOST}:{ports.iscsi}",
                "--api-listen", f"{HOST}:{ports.api}",
                "--replication-listen", f"{HOST}:{ports.replication}",
                "--master", layout.master,
                "--shutdown-timeout", str(SERVE_SHUTDOWN_S),
            ]  # fmt: skip
            self.servers.append(Child(f"server {i}", argv, logs / f"server-{i}.out",
                                      logs / f"server-{i}.log"))  # fmt: skip
        self.server_ids: dict[int, str] = {}
        self.stop = asyncio.Event()
        #: Set once every process is stopped (a `down` request answers then).
        self.stopped = asyncio.Event()
        self.reported: set[int] = set()
        #: Set once every process started and cluster.env is written.
        self.ready = False

    @property
    def env_path(self) -> Path:
        return self.dir / CLUSTER_ENV

    async def start(self) -> None:
        say(f"starting the master on {self.layout.master} (store {self.dir}/master.db)")
        self.master.spawn()
        await self.master.wait_ready()
        say(f"  master ready (pid {self.master.pid})")
        for i, child in enumerate(self.servers, start=1):
            say(f"starting volume server {i} (data {self.dir}/server-{i})")
            child.spawn()
        for i, child in enumerate(self.servers, start=1):
            await child.wait_ready()
            say(f"  server {i} ready (pid {child.pid}): {child.fields.get('api', '?')}")
        say(f"waiting for the master to see {len(self.servers)} servers alive")
        await self._learn_server_ids()
        self.write_env()
        self.ready = True

    async def _learn_server_ids(self) -> None:
        from blockyard.master.client import MasterClient  # noqa: PLC0415  # grpc is heavy

        api_to_index = {f"{HOST}:{p.api}": i for i, p in enumerate(self.layout.servers, start=1)}
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        async with MasterClient(self.layout.master, timeout_s=REGISTER_TIMEOUT_S) as client:
            while True:
                alive = {
                    api_to_index[s.addresses.api]: s.server_id
                    for s in await client.list_servers()
                    if s.state == "alive" and s.addresses.api in api_to_index
                }
                if len(alive) == len(self.servers):
                    self.server_ids = alive
                    return
                if time.monotonic() > deadline:
                    missing = sorted(set(api_to_index.values()) - set(alive))
                    raise BlockyardTimeoutError(
                        f"the master lists servers {missing} not alive {REGISTER_TIMEOUT_S:.0f} s "
                        f"after they started; see {self.dir}/logs"
                    )
                await asyncio.sleep(POLL_INTERVAL_S)

    def write_env(self) -> None:
        entries = [
            ServerEntry(
                index=i,
                server_id=self.server_ids.get(i, ""),
                api=f"{HOST}:{p.api}",
                iscsi=f"{HOST}:{p.iscsi}",
                replication=f"{HOST}:{p.replication}",
                data_dir=str(self.dir / f"server-{i}"),
                pid=self.servers[i - 1].pid,
            )
            for i, p in enumerate(self.layout.servers, start=1)
        ]
        write_atomically(
            self.env_path, env_text(self.layout.master, self.master.pid, os.getpid(), entries)
        )

    def print_usage(self) -> None:
        m = self.layout.master
        by = "blockyard"
        say(f"\ncluster ready: master {m}, {len(self.servers)} volume servers; see {self.env_path}")
        for i, child in enumerate(self.servers, start=1):
            say(f"  server {i}: id {self.server_ids.get(i, '?')}  api {child.fields.get('api')}  "
                f"iscsi {child.fields.get('iscsi')}  pid {child.pid}")  # fmt: skip
        say(
            "\nuse it:\n"
            f"  {by} volume create vol1 --size 1GiB --replicas 2 --durability sync_all "
            f"--master {m}\n"
            f"  {by} attach vol1 --master {m} --fs ext4 /mnt/vol1\n"
            f"  {by} status --master {m}\n"
            f"  {by} up --dir {self.dir} --restart-server I   # after killing server I\n"
            f"  {by} down --dir {self.dir}                    # or Ctrl-C here\n",
        )

    async def watch(self) -> None:
        """Report children that exit (once each) until told to stop."""
        while not self.stop.is_set():
            for child in (self.master, *self.servers):
                if child.proc is not None and not child.alive() and child.pid not in self.reported:
                    self.reported.add(child.pid)
                    rc = child.proc.returncode
                    how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
                    hint = "stop the cluster and start it again"
                    if child is not self.master:
                        i = self.servers.index(child) + 1
                        hint = (
                            f"restart it with `blockyard up --dir {self.dir} --restart-server {i}`"
                        )
                    say(f"{child.label} (pid {child.pid}) exited, {how}; it stays down ({hint})")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self.stop.wait()

    async def restart_server(self, index: int) -> str:
        if not 1 <= index <= len(self.servers):
            raise InvalidArgumentError(
                f"there is no server {index}: this cluster has servers 1 to {len(self.servers)}"
            )
        if not self.ready or self.stop.is_set():
            raise ServerUnavailableError(
                f"the cluster in {self.dir} is {'stopping' if self.stop.is_set() else 'starting'}"
                "; restart a server once it is ready"
            )
        child = self.servers[index - 1]
        if child.alive():
            raise AlreadyExistsError(
                f"server {index} is running (pid {child.pid}); kill it first to restart it"
            )
        say(f"restarting volume server {index} on its old data directory and ports")
        child.spawn()
        await child.wait_ready()
        self.write_env()
        say(f"  server {index} ready again (pid {child.pid})")
        return f"ok pid={child.pid}"

    async def close(self) -> None:
        say("stopping: volume servers first, then the master")
        with contextlib.suppress(FileNotFoundError):
            self.env_path.unlink()
        await stop_children(self.servers)
        await stop_children([self.master])
        say("stopped; no process left")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One control request: ``down`` (answered once everything stopped) or ``restart I``."""
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT_S):
                line = (await reader.readline())[:CONTROL_LINE_MAX_BYTES].decode(errors="replace")
                words = line.split()
                if words == ["down"]:
                    self.stop.set()
                    await self.stopped.wait()
                    reply = "ok stopped"
                elif len(words) == 2 and words[0] == "restart" and words[1].isdigit():
                    try:
                        reply = await self.restart_server(int(words[1]))
                    except BlockyardError as exc:
                        reply = f"error {exc}"
                else:
                    reply = f"error unknown request {line.strip()!r}"
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # the client gave up or went away; nothing to answer
        finally:
            writer.close()


async def control(directory: Path, request: str, timeout_s: float = CONTROL_TIMEOUT_S) -> str:
    """Send one request to the running ``up`` in ``directory``; its one-line reply."""
    path = socket_path(directory)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ServerUnavailableError(
            f"no `blockyard up` runs in {directory} (nothing answers on {path}); start one "
            f"with `blockyard up --dir {directory}`"
        ) from exc
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(request.encode() + b"\n")
            await writer.drain()
            return (await reader.readline()).decode(errors="replace").strip()
    except TimeoutError as exc:
        raise BlockyardTimeoutError(
            f"`blockyard up` in {directory} did not answer {request!r} within {timeout_s:.0f} s"
        ) from exc
    finally:
        writer.close()


async def supervise(directory: Path, server_count: int) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    path = socket_path(directory)
    with contextlib.suppress(ServerUnavailableError):
        await control(directory, "ping", timeout_s=5.0)
        raise AlreadyExistsError(
            f"a cluster already runs in {directory}; stop it with `blockyard down --dir "
            f"{directory}` or use another --dir"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by an `up` that was killed
    with contextlib.suppress(FileNotFoundError):
        (directory / CLUSTER_ENV).unlink()
    cluster = Cluster(directory.resolve(), load_or_make_layout(directory, server_count))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cluster.stop.set)
    server = await asyncio.start_unix_server(cluster.handle, path)
    start = asyncio.create_task(cluster.start())
    stop_wait = asyncio.create_task(cluster.stop.wait())
    try:
        await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            say("interrupted while starting")
            return 1
        stop_wait.cancel()
        start.result()  # raises what failed the start
        cluster.print_usage()
        await cluster.watch()
        return 0
    finally:
        stop_wait.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await cluster.close()
        cluster.stopped.set()
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # Let a `down` waiting on its reply get it before the loop ends.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await server.wait_closed()


def run_up(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if args.restart_server is not None:
        reply = asyncio.run(control(directory, f"restart {args.restart_server}"))
        return _print_reply(reply)
    if not 1 <= args.servers <= SERVERS_MAX:
        raise InvalidArgumentError(f"--servers {args.servers}: give 1 to {SERVERS_MAX}")
    return asyncio.run(supervise(directory, args.servers))


def run_down(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        reply = asyncio.run(control(directory, "down"))
    except ServerUnavailableError:
        return _kill_orphans(directory)
    return _print_reply(reply)


def _print_reply(reply: str) -> int:
    if reply.startswith("ok"):
        print(reply)
        return 0
    raise ServerUnavailableError(reply.removeprefix("error ") or "`blockyard up` did not answer")


def _kill_orphans(directory: Path) -> int:
    """No ``up`` answers (it was killed): stop the processes its cluster.env still names —
    only those whose command line names this directory, so a reused PID is left alone."""
    env_path = directory / CLUSTER_ENV
    if not env_path.exists():
        load_layout(directory)  # raises "no cluster here" when there never was one
        print(f"no cluster runs in {directory}; nothing to stop")
        return 0
    env = read_env(env_path)
    marker = str(directory.resolve())
    pids = [int(v) for k, v in env.items() if k.endswith("_PID") and v.isdigit()]
    mine = []
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmdline and "blockyard" in cmdline:
                mine.append(pid)
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in mine):
        time.sleep(POLL_INTERVAL_S)
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    env_path.unlink()
    print(f"no `blockyard up` answered; stopped {len(mine)} leftover processes")
    return 0
