"""Serve engine volumes over iSCSI from one data directory. For tests and local trials only.

    python -m blockyard.server.standalone --data-dir D --listen 127.0.0.1:3260 \\
        --create NAME:SIZE [--volume NAME ...]

Each volume is exported as ``iqn.2026-11.io.blockyard:<name>`` (see
:func:`blockyard.iscsi.discovery.iqn_for_volume`), LUN 0, NAA from the volume UUID, ALUA
active/optimized, persistent reservations in ``<volume dir>/reservations.json``. The process
prints ``READY <host>:<port>`` on stdout once it listens and exits cleanly on SIGTERM/SIGINT.
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
from blockyard.scsi.alua import StaticAlua
from blockyard.scsi.identity import LuIdentity
from blockyard.scsi.lu import LogicalUnit
from blockyard.scsi.reservations import FileReservationStore
from blockyard.server.iscsi_server import (
    DictTargetRegistry,
    IscsiServer,
    ServedTarget,
    install_uvloop,
)

IQN_PREFIX = "iqn.2026-11.io.blockyard"
RESERVATIONS_FILE = "reservations.json"
SHUTDOWN_TIMEOUT_S = 5.0
_SIZE_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``1G``, ``64M``, ``1048576`` -> bytes (binary suffixes)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in _SIZE_SUFFIXES:
        return int(text[:-1]) * _SIZE_SUFFIXES[text[-1]]
    return int(text)


def served_target(volume: Volume) -> ServedTarget:
    """A :class:`ServedTarget` for ``volume`` with the standalone conventions above."""
    store = FileReservationStore(
        os.path.join(volume.directory, RESERVATIONS_FILE), volume=volume.name
    )
    lu = LogicalUnit(
        volume,
        LuIdentity(volume.uuid),
        StaticAlua.single(),
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


async def serve(host: str, port: int, volumes: Sequence[Volume]) -> None:
    registry = DictTargetRegistry([served_target(v) for v in volumes])
    server = IscsiServer(registry, host, port)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {host}:{server.port}", flush=True)
    for target in registry.targets():
        print(f"TARGET {target.name}", flush=True)
    await stop.wait()
    await server.close(SHUTDOWN_TIMEOUT_S)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--listen", default="127.0.0.1:3260", help="HOST:PORT (port 0 = any)")
    parser.add_argument("--create", action="append", default=[], metavar="NAME:SIZE")
    parser.add_argument("--volume", action="append", default=[], metavar="NAME")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    host, _, port_text = args.listen.rpartition(":")
    store = VolumeStore(args.data_dir)
    volumes = open_volumes(store, args.create, args.volume)
    if not volumes:
        parser.error("nothing to serve: give --create NAME:SIZE or --volume NAME")
    install_uvloop()
    try:
        asyncio.run(serve(host or "127.0.0.1", int(port_text), volumes))
    finally:
        for volume in volumes:
            try:
                volume.close()
            except (BlockyardError, OSError):
                logging.getLogger(__name__).exception("closing volume %s failed", volume.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
