"""Serve engine volumes over iSCSI from one data directory. For tests and local trials only.

    python -m blockyard.server.standalone --data-dir D --listen 127.0.0.1:3260 \\
        --create NAME:SIZE [--volume NAME ...] [--listen HOST:PORT ...] [--control-stdin]

Each volume is exported as ``iqn.2026-11.io.blockyard:<name>`` (see
:func:`blockyard.iscsi.discovery.iqn_for_volume`), LUN 0, NAA from the volume UUID, ALUA
active/optimized, persistent reservations in ``<volume dir>/reservations.json``. The process
prints ``READY <host>:<port>`` on stdout once it listens and exits cleanly on SIGTERM/SIGINT.

Multipath trials: each ``--listen`` is its own target port (relative port id and target port
group id 1, 2, ... in order); group 1 starts active/optimized and the others standby, and one
``READY`` line is printed per listener. With ``--control-stdin`` the process reads commands
from stdin, one per line, and answers ``OK <command>`` (or ``ERR <reason>``) on stdout:

- ``active G``: group G becomes active/optimized and every other group standby, passing
  through "transitioning" for TRANSITION_PAUSE_S; every I_T nexus gets ASYMMETRIC ACCESS
  STATE CHANGED;
- ``down G``: close group G's listener and every session on it (a dead portal);
- ``up G``: listen again on group G's address.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from blockyard.engine.store import VolumeStore
from blockyard.engine.volume import Volume
from blockyard.errors import BlockyardError
from blockyard.iscsi.discovery import iqn_for_volume
from blockyard.iscsi.login import TargetConfig
from blockyard.scsi.alua import AccessState, StaticAlua, TargetPortGroup
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.reservations import FileReservationStore
from blockyard.server.iscsi_server import (
    DictTargetRegistry,
    IscsiServer,
    ServedTarget,
    ServerSettings,
    install_uvloop,
)

IQN_PREFIX = "iqn.2026-11.io.blockyard"
RESERVATIONS_FILE = "reservations.json"
SHUTDOWN_TIMEOUT_S = 5.0
#: How long ``active G`` holds every group in the transitioning state (SPC-4 §5.15.2.6).
TRANSITION_PAUSE_S = 0.3
_SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``1G``, ``64M``, ``1048576`` -> bytes (binary suffixes)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in _SIZE_SUFFIXES:
        return int(text[:-1]) * _SIZE_SUFFIXES[text[-1]]
    return int(text)


def port_groups(count: int) -> StaticAlua:
    """Group i (1-based) holds relative port i; group 1 starts active/optimized, the rest
    standby, as a primary and its replicas would."""
    if count == 1:
        return StaticAlua.single()
    return StaticAlua(
        [
            TargetPortGroup(
                i,
                AccessState.ACTIVE_OPTIMIZED if i == 1 else AccessState.STANDBY,
                (i,),
                preferred=i == 1,
            )
            for i in range(1, count + 1)
        ]
    )


def served_target(volume: Volume, alua: StaticAlua | None = None) -> ServedTarget:
    """A :class:`ServedTarget` for ``volume`` with the standalone conventions above."""
    store = FileReservationStore(
        os.path.join(volume.directory, RESERVATIONS_FILE), volume=volume.name
    )
    lu = LogicalUnit(
        volume,
        LuIdentity(volume.uuid),
        alua if alua is not None else StaticAlua.single(),
        store,
        volume_name=volume.name,
    )
    config = TargetConfig(iqn_for_volume(IQN_PREFIX, volume.name), alias=volume.name)
    return ServedTarget(config, lu)


def open_volumes(store: VolumeStore, create: Sequence[str], names: Sequence[str]) -> list[Volume]:
    volumes: list[Volume] = []
    for spec in create:
        name, _, size = spec.partition(":")
        if not size:
            raise SystemExit(f"--create wants NAME:SIZE, got {spec!r}")
        if store.exists(name):
            volumes.append(store.open(name))
        else:
            volumes.append(store.create(name, parse_size(size)))
    volumes.extend(store.open(name) for name in names)
    return volumes


async def serve(
    listens: Sequence[tuple[str, int]], volumes: Sequence[Volume], *, control: bool = False
) -> None:
    alua = port_groups(len(listens))
    registry = DictTargetRegistry([served_target(v, alua) for v in volumes])
    servers: list[IscsiServer] = []
    for group, (host, port) in enumerate(listens, start=1):
        settings = ServerSettings(relative_target_port_id=group, target_port_group_id=group)
        servers.append(IscsiServer(registry, host, port, settings=settings))
    for server in servers:
        await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for server in servers:
        print(f"READY {server.host}:{server.port}", flush=True)
    for target in registry.targets():
        print(f"TARGET {target.name}", flush=True)
    controller = asyncio.create_task(_control(servers, registry, alua, stop)) if control else None
    await stop.wait()
    if controller is not None:
        controller.cancel()
    for server in servers:
        await server.close(SHUTDOWN_TIMEOUT_S)


async def _control(
    servers: list[IscsiServer], registry: DictTargetRegistry, alua: StaticAlua, stop: asyncio.Event
) -> None:
    """Apply ``active``/``down``/``up`` commands read from stdin (see the module docstring)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        line = await reader.readline()
        if not line:
            return
        command = line.decode(errors="replace").strip()
        verb, _, arg = command.partition(" ")
        if not arg.isdigit() or not 1 <= int(arg) <= len(servers):
            print(f"ERR {command!r}: want 'active|down|up GROUP' with GROUP 1..{len(servers)}",
                  flush=True)  # fmt: skip
            continue
        group = int(arg)
        server = servers[group - 1]
        if verb == "active":
            _set_states(registry, alua, len(servers), None)
            await asyncio.sleep(TRANSITION_PAUSE_S)
            _set_states(registry, alua, len(servers), group)
        elif verb == "down":
            await server.close(SHUTDOWN_TIMEOUT_S)
        elif verb == "up":
            # A fresh server on the port the old one had (the old one may have been port 0).
            fresh = IscsiServer(registry, server.host, server.port, settings=server.settings)
            await fresh.start()
            servers[group - 1] = fresh
        else:
            print(f"ERR unknown command {command!r}", flush=True)
            continue
        print(f"OK {command}", flush=True)


def _set_states(
    registry: DictTargetRegistry, alua: StaticAlua, count: int, active: int | None
) -> None:
    """``active`` None puts every group in transition; else it is the one active group."""
    for group in range(1, count + 1):
        if active is None:
            state = AccessState.TRANSITIONING
        else:
            state = AccessState.ACTIVE_OPTIMIZED if group == active else AccessState.STANDBY
        alua.set_state(group, state)
    for target in registry.targets():
        target.logical_unit.notify_alua_changed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        help="HOST:PORT (port 0 = any); repeat for one target port group per address",
    )
    parser.add_argument("--control-stdin", action="store_true", help="read ALUA commands")
    parser.add_argument("--create", action="append", default=[], metavar="NAME:SIZE")
    parser.add_argument("--volume", action="append", default=[], metavar="NAME")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    listens: list[tuple[str, int]] = []
    for listen in args.listen or ["127.0.0.1:3260"]:
        host, _, port_text = listen.rpartition(":")
        listens.append((host or "127.0.0.1", int(port_text)))
    store = VolumeStore(args.data_dir)
    volumes = open_volumes(store, args.create, args.volume)
    if not volumes:
        parser.error("nothing to serve: give --create NAME:SIZE or --volume NAME")
    install_uvloop()
    try:
        asyncio.run(serve(listens, volumes, control=args.control_stdin))
    finally:
        for volume in volumes:
            try:
                volume.close()
            except (BlockyardError, OSError):
                logging.getLogger(__name__).exception("closing volume %s failed", volume.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
