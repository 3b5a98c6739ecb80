"""``blockyard csi``: run the CSI plugin (driver ``block.blockyard.io``) on a unix socket.

Modes: ``controller`` provisions through a volume server, or through the master with
``--backend master://HOST:PORT[,HOST:PORT]`` (replicated volumes), and keeps which nodes
each volume is published to under --state-dir; ``node`` attaches and mounts on this node;
``all`` runs both. Prints ``READY endpoint=unix://PATH mode=MODE`` on stdout once serving.
SIGTERM or SIGINT stops it: no new RPCs, running ones finish within the shutdown timeout,
and the socket file is removed.

Exit codes: 0 after a clean stop, 1 when it cannot start (the message says why), 2 for usage
errors (bad mode, endpoint, managed prefix or address, or plaintext to a --backend off
loopback without --insecure).

The CSI socket is local and has no TLS; ``--tls-cert``, ``--tls-key`` and ``--tls-ca`` are what
the plugin presents to, and checks the volume server (or the master and every copy's volume
server) with, when it dials ``--backend``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from typing import Final

from blockyard import tls
from blockyard.csi.node_config import (
    DEFAULT_ATTACH_STATE_DIR,
    DEFAULT_MOUNT_STORM_THRESHOLD,
    DEFAULT_NODE_STATE_DIR,
    AttachLauncher,
    AttachMode,
    parse_node_options,
)
from blockyard.csi.server import (
    DEFAULT_KUBELET_DIR,
    DEFAULT_STATE_DIR,
    ConfigError,
    CsiConfig,
    CsiServer,
    StartError,
    build_config,
)

log = logging.getLogger("blockyard.cli.csi")

EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "csi",
        help="run the CSI plugin (controller, node or both) on a unix socket",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--endpoint", required=True, help="unix:///PATH.sock to serve CSI on")
    p.add_argument("--mode", required=True, help="controller, node or all")
    p.add_argument("--node-id", required=True, help="this node's name (NodeGetInfo node_id)")
    p.add_argument(
        "--backend",
        metavar="HOST:PORT|master://HOST:PORT[,HOST:PORT]",
        help="a volume server's management API, or the master (replicated volumes)",
    )
    p.add_argument(
        "--state-dir",
        help=f"controller state: volume records and publications (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument("--kubelet-dir", help=f"kubelet root directory (default {DEFAULT_KUBELET_DIR})")
    p.add_argument(
        "--managed-prefix",
        help="IQN prefix of the targets this node plugin owns (required in node and all modes)",
    )
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="Prometheus metrics address")
    p.add_argument(
        "--topology",
        metavar="KEY=VALUE",
        help="the topology segment volumes are accessible from "
        "(default topology.block.blockyard.io/pool=default)",
    )
    node = p.add_argument_group("node service (--mode node|all)")
    node.add_argument(
        "--attach-mode",
        choices=[m.value for m in AttachMode],
        help="kernel (open-iscsi), userspace (FUSE + loop) or auto: kernel when iscsiadm is "
        "installed (default auto)",
    )
    node.add_argument(
        "--attach-launcher",
        choices=[m.value for m in AttachLauncher],
        help="how userspace attach daemons start: direct (forked) or systemd-run (a transient "
        "unit on the host, outside the plugin container's cgroup; default direct)",
    )
    node.add_argument("--attach-state-dir", help=f"default {DEFAULT_ATTACH_STATE_DIR}")
    node.add_argument(
        "--node-state-dir",
        help=f"staged volumes and circuit breakers (default {DEFAULT_NODE_STATE_DIR})",
    )
    node.add_argument(
        "--mount-storm-threshold",
        type=int,
        help=f"refuse to mount when one source is mounted this often "
        f"(default {DEFAULT_MOUNT_STORM_THRESHOLD})",
    )
    tls.add_arguments(p, role="dial")  # for --backend
    p.add_argument(
        "--master-insecure",
        action="store_true",
        help="with --backend master://: dial the master in plaintext off loopback (a master "
        "run with --insecure); the --tls-* flags then cover only the volume servers",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(
            endpoint=args.endpoint,
            mode=args.mode,
            node_id=args.node_id,
            backend=args.backend,
            state_dir=args.state_dir,
            kubelet_dir=args.kubelet_dir,
            managed_prefix=args.managed_prefix,
            metrics_listen=args.metrics_listen,
            topology=args.topology,
            backend_security=tls.from_args(args),
            master_insecure=args.master_insecure,
        )
        config = dataclasses.replace(
            config,
            node_options=parse_node_options(
                attach_mode=args.attach_mode,
                attach_launcher=args.attach_launcher,
                attach_state_dir=args.attach_state_dir,
                node_state_dir=args.node_state_dir,
                mount_storm_threshold=args.mount_storm_threshold,
            ),
        )
    except (ConfigError, ValueError) as exc:
        print(f"blockyard csi: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # gRPC's asyncio support runs on the standard event loop; uvloop is not used here.
    return asyncio.run(serve(config))


async def serve(config: CsiConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    server = CsiServer(config)
    try:
        await server.start()
    except ConfigError as exc:
        print(f"blockyard csi: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartError as exc:
        print(f"blockyard csi: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(server.ready_line(), flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopping: finishing running RPCs within %.0f s", config.shutdown_timeout_s)
    await server.stop()
    return 0
