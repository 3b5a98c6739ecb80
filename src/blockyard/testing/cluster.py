"""Several real ``blockyard serve`` processes on this machine, for tests, benchmarks and demos.

Each :class:`ServerProc` keeps its data directory and its ports across restarts (ports are
picked free once and then fixed), because a replica is named by its replication address: a
server that comes back on another port would be another replica. Servers are stopped with
SIGTERM or killed with SIGKILL, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from blockyard.engine.epoch import Role
from blockyard.netports import free_port
from blockyard.replication.commit import DurabilityMode
from blockyard.replication.report import ReplicationInfo
from blockyard.server.client import VolumeServerClient

T = TypeVar("T")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
API_TIMEOUT_S = 30.0
API_SLOW_TIMEOUT_S = 120.0


@dataclass
class ServerProc:
    """One volume server: fixed data directory and ports; start, stop, kill, restart."""

    name: str
    data_dir: Path
    log_dir: Path
    iscsi_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    replication_port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[str] | None = None
    starts: int = 0

    @property
    def api(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    @property
    def portal(self) -> str:
        return f"127.0.0.1:{self.iscsi_port}"

    @property
    def replication_address(self) -> str:
        return f"127.0.0.1:{self.replication_port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        """Start and wait for READY (raises with the log on failure)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        argv = [sys.executable, "-m", "blockyard.cli.main", "--log-level", "INFO", "serve"]
        argv += ["--data-dir", str(self.data_dir), "--api-listen", self.api]
        argv += ["--iscsi-listen", self.portal]
        argv += ["--replication-listen", self.replication_address]
        argv += ["--shutdown-timeout", "10", *self.extra_args]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        out = self.process.stdout
        assert out is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            self.kill()
            raise RuntimeError(
                f"{self.name} printed nothing in {START_TIMEOUT_S} s: {self.log_path.read_text()}"
            ) from None
        if not line.startswith("READY "):
            self.kill()
            raise RuntimeError(f"{self.name} did not start: {self.log_path.read_text()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, as in a crash (its page cache survives)."""
        self._end(signal.SIGKILL)

    def stop(self) -> int:
        """SIGTERM: a graceful stop (flushes and closes every volume)."""
        return self._end(signal.SIGTERM)

    def _end(self, sig: int) -> int:
        proc = self.process
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=STOP_TIMEOUT_S)
        if proc.stdout is not None:
            proc.stdout.close()
        return code

    def restart(self) -> None:
        self.start()

    def call(self, fn: Callable[[VolumeServerClient], Awaitable[T]]) -> T:
        """Run one or more API calls against this server (a fresh client each time)."""

        async def main() -> T:
            async with VolumeServerClient(
                self.api, timeout_s=API_TIMEOUT_S, slow_timeout_s=API_SLOW_TIMEOUT_S
            ) as client:
                return await fn(client)

        return asyncio.run(main())


@dataclass
class LocalCluster:
    """A few volume servers under one directory."""

    root: Path
    servers: list[ServerProc] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, count: int, *, extra_args: Sequence[str] = ()) -> LocalCluster:
        cluster = cls(root)
        for i in range(count):
            cluster.servers.append(
                ServerProc(
                    f"server{i}",
                    root / f"server{i}" / "data",
                    root / "logs",
                    extra_args=tuple(extra_args),
                )
            )
        return cluster

    def start(self) -> None:
        for s in self.servers:
            s.start()

    def stop(self) -> None:
        for s in self.servers:
            if s.running:
                s.stop()

    def replicate(
        self,
        name: str,
        size_bytes: int,
        *,
        primary: int = 0,
        replicas: Sequence[int] = (1,),
        mode: DurabilityMode = DurabilityMode.SYNC_ALL,
        epoch: int = 1,
        resync_limit_bps: int = 0,
    ) -> ReplicationInfo:
        """Create ``name`` on the primary (if needed) and replicate it to ``replicas``, as
        ``blockyard volume replicate`` does."""
        p = self.servers[primary]
        desc = p.call(lambda c: c.create_volume(name, size_bytes))
        for i in replicas:
            r = self.servers[i]

            async def setup(c: VolumeServerClient) -> None:
                await c.create_volume(name, size_bytes, volume_uuid=desc.uuid)
                await c.set_replication(name, role=Role.REPLICA, epoch=epoch)

            r.call(setup)
        addresses = [self.servers[i].replication_address for i in replicas]
        return p.call(
            lambda c: c.set_replication(
                name,
                role=Role.PRIMARY,
                epoch=epoch,
                mode=mode,
                replicas=addresses,
                resync_limit_bps=resync_limit_bps,
            )
        )

    def wait_in_sync(self, name: str, *, primary: int = 0, timeout_s: float = 60.0) -> None:
        """Until every replica of ``name`` is in sync (raises with the state on timeout)."""
        deadline = time.monotonic() + timeout_s
        info: ReplicationInfo | None = None
        while time.monotonic() < deadline:
            info = self.servers[primary].call(lambda c: c.get_replication(name))
            if info.replicas and all(r.state == "in_sync" for r in info.replicas):
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} not in sync within {timeout_s} s: {info}")

    def checksum(self, name: str, server: int) -> tuple[str, int]:
        c = self.servers[server].call(lambda c: c.checksum_volume(name))
        return c.sha256, c.last_lsn
