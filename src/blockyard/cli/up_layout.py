"""What ``blockyard up`` keeps in its directory, and how ``down`` finds it.

::

    DIR/cluster.json        ports of the master and of every volume server (kept across runs, so
                            a restarted server comes back on its old addresses)
    DIR/cluster.env         written once the cluster is ready, removed when it stops (shell:
                            MASTER=, SERVER_<i>_ID=, SERVER_<i>_API=, SERVER_<i>_PID=, ...)
    DIR/up.sock             the running ``up``'s control socket (``down``, ``restart I``)
    DIR/master.db           the master's SQLite store
    DIR/server-<i>/         volume server i's data directory (its server id lives there)
    DIR/logs/               each process's stdout (the READY line) and stderr
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from blockyard import netports
from blockyard.errors import InvalidArgumentError

CLUSTER_ENV: Final = "cluster.env"
LAYOUT_FILE: Final = "cluster.json"
CONTROL_SOCKET: Final = "up.sock"
#: sun_path is 108 bytes on Linux (unix(7)), the terminating NUL included.
SOCKET_PATH_MAX_BYTES: Final = 107
#: A laptop cluster, not a fleet: bounds the processes one ``up`` starts.
SERVERS_MAX: Final = 9
HOST: Final = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ServerPorts:
    iscsi: int
    api: int
    replication: int


@dataclass(frozen=True, slots=True)
class Layout:
    master_port: int
    servers: tuple[ServerPorts, ...]

    @property
    def master(self) -> str:
        return f"{HOST}:{self.master_port}"


def free_port() -> int:
    """A port free right now on the loopback address, never handed out twice."""
    return netports.free_port(HOST)


def new_layout(server_count: int) -> Layout:
    servers = tuple(ServerPorts(free_port(), free_port(), free_port()) for _ in range(server_count))
    return Layout(free_port(), servers)


def load_or_make_layout(directory: Path, server_count: int) -> Layout:
    """The ports of the last run in ``directory`` when it had as many servers, else new ones."""
    path = directory / LAYOUT_FILE
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        raw = json.loads(path.read_text())
        old = Layout(int(raw["master_port"]), tuple(ServerPorts(**s) for s in raw["servers"]))
        if len(old.servers) == server_count:
            return old
    layout = new_layout(server_count)
    write_atomically(path, json.dumps(asdict(layout), indent=2) + "\n")
    return layout


def load_layout(directory: Path) -> Layout:
    path = directory / LAYOUT_FILE
    try:
        raw = json.loads(path.read_text())
        return Layout(int(raw["master_port"]), tuple(ServerPorts(**s) for s in raw["servers"]))
    except FileNotFoundError as exc:
        raise InvalidArgumentError(
            f"{directory} holds no cluster ({path} is missing): start one with "
            f"`blockyard up --dir {directory}`"
        ) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgumentError(
            f"{path} is not a layout `blockyard up` wrote ({exc}); remove it and run up again"
        ) from exc


def write_atomically(path: Path, text: str) -> None:
    """Temp file + fsync + rename: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@dataclass(frozen=True, slots=True)
class ServerEntry:
    index: int
    server_id: str
    api: str
    iscsi: str
    replication: str
    data_dir: str
    pid: int


def env_text(master: str, master_pid: int, up_pid: int, servers: list[ServerEntry]) -> str:
    """``cluster.env``: shell assignments, values quoted for ``source``/``.``."""
    lines = [
        "# written by `blockyard up` once the cluster was ready; removed when it stops",
        f"MASTER={shlex.quote(master)}",
        f"MASTER_PID={master_pid}",
        f"UP_PID={up_pid}",
        f"SERVERS={len(servers)}",
    ]
    for s in servers:
        p = f"SERVER_{s.index}_"
        lines += [
            f"{p}ID={shlex.quote(s.server_id)}",
            f"{p}API={shlex.quote(s.api)}",
            f"{p}PID={s.pid}",
            f"{p}ISCSI={shlex.quote(s.iscsi)}",
            f"{p}REPLICATION={shlex.quote(s.replication)}",
            f"{p}DATA_DIR={shlex.quote(s.data_dir)}",
        ]
    return "\n".join(lines) + "\n"


def read_env(path: Path) -> dict[str, str]:
    """The assignments of a ``cluster.env`` (the subset of shell syntax :func:`env_text` writes)."""
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        words = shlex.split(value)
        out[key] = words[0] if words else ""
    return out


def socket_path(directory: Path) -> str:
    path = str(directory.resolve() / CONTROL_SOCKET)
    if len(os.fsencode(path)) > SOCKET_PATH_MAX_BYTES:
        raise InvalidArgumentError(
            f"--dir {directory} is too deep: its control socket path would be {len(path)} bytes, "
            f"the limit is {SOCKET_PATH_MAX_BYTES}; use a shorter directory"
        )
    return path
