"""``blockyard serve``: run a volume server on a data directory.

Exports every volume over iSCSI on each ``--iscsi-listen`` portal (each its own portal group)
and serves the management API (``blockyard.v1.VolumeServer``) on ``--api-listen``. Prints
``READY iscsi=HOST:PORT[,...] api=HOST:PORT`` on stdout once serving. SIGTERM or SIGINT stops
it: no new API calls or iSCSI commands, running ones finish or are aborted, every volume is
flushed and closed, and the process exits 0 within ``--shutdown-timeout``.

The management API uses mutual TLS with ``--tls-cert``, ``--tls-key`` and ``--tls-ca`` (clients
must present a certificate signed by that CA). Without them it listens only on a loopback
address, unless ``--insecure`` accepts plaintext elsewhere. With ``--master``, the same flags
say how the master is dialed: mutual TLS with the same certificate (which then needs both
extended key usages, serverAuth and clientAuth; ``--tls-server-name`` when the master's
certificate names another host than the one dialed), or plaintext, which off loopback needs
``--insecure`` too.

``--master HOST:PORT[,HOST:PORT]`` registers with the master under the server id kept in the
data directory and heartbeats to it (``--heartbeat-interval``, ``--zone``); the master assigns
roles and grants leases, and a primary whose lease lapses answers writes and flushes with NOT
READY until it has one again. Without it the server runs standalone.

``--metrics-listen`` serves Prometheus metrics over plain HTTP (as ``blockyard csi`` does; the
READY line then ends with ``metrics=http://HOST:PORT/metrics``). Free space in the data
directory is checked every few seconds: below ``--space-soft-threshold`` every volume's
initiators get THIN PROVISIONING SOFT THRESHOLD REACHED, before writes fail for lack of space.

Exit codes: 0 after a clean stop, 1 when it cannot start or stop cleanly (the message says
why), 2 for usage errors (including plaintext off loopback without --insecure).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import signal
import sys
from typing import Final

from blockyard import tls
from blockyard.cli.sizes import parse_size
from blockyard.errors import TlsConfigError
from blockyard.server.daemon import (
    DaemonConfig,
    StartError,
    VolumeServerDaemon,
    parse_address,
)
from blockyard.server.heartbeat import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    MAX_HEARTBEAT_INTERVAL_S,
    MIN_HEARTBEAT_INTERVAL_S,
)
from blockyard.server.manager import DEFAULT_IQN_PREFIX
from blockyard.server.space_task import DEFAULT_SOFT_THRESHOLD, SoftThreshold

log = logging.getLogger("blockyard.cli.serve")

DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 30.0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "serve",
        help="run a volume server: iSCSI targets plus the gRPC management API",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", required=True, help="directory holding the volumes")
    p.add_argument(
        "--iscsi-listen",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="iSCSI portal (port 0 = any free port); repeat for several portal groups",
    )
    p.add_argument(
        "--api-listen", required=True, metavar="HOST:PORT", help="management API address"
    )
    p.add_argument("--iqn-prefix", default=DEFAULT_IQN_PREFIX, help="targets are PREFIX:<volume>")
    p.add_argument(
        "--advertise-host",
        help="host initiators should use for the portals (default: the listen host, or this "
        "machine's name when listening on a wildcard address)",
    )
    p.add_argument(
        "--replication-listen",
        metavar="HOST:PORT",
        help="accept primaries' replication connections here (this server holds replica "
        "copies); primaries name this address in their replica set",
    )
    p.add_argument(
        "--replication-advertise",
        metavar="HOST",
        help="host primaries should dial for --replication-listen (default: its host, or "
        "127.0.0.1 for a wildcard)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over plain HTTP here (port 0 = any free port)",
    )
    p.add_argument(
        "--space-soft-threshold",
        type=parse_soft_threshold,
        default=DEFAULT_SOFT_THRESHOLD,
        metavar="PCT%%|SIZE[,...]",
        help="report low space (a unit attention to every initiator, a log line, a metric) "
        "when the data directory's free space falls below this share of its filesystem "
        "(e.g. 10%%) or this size (e.g. 2GiB, capped at half the filesystem), whichever is "
        "larger; 0 turns it off (default: 10%%,256MiB)",
    )
    p.add_argument(
        "--master",
        metavar="HOST:PORT[,HOST:PORT]",
        help="register with the master(s) and heartbeat to them; the master then assigns "
        "roles, and primaries acknowledge writes only under its lease (default: standalone)",
    )
    p.add_argument("--zone", default="", help="this server's zone, for placement (with --master)")
    p.add_argument(
        "--heartbeat-interval",
        type=parse_interval,
        default=DEFAULT_HEARTBEAT_INTERVAL_S,
        metavar="DURATION",
        help="how often to heartbeat to the master, e.g. 500ms or 1s (default 500ms; the "
        "master may ask for another)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="SECONDS",
        help=f"bound on a graceful stop (default {DEFAULT_SHUTDOWN_TIMEOUT_S:.0f})",
    )
    tls.add_arguments(p, role="both")
    p.set_defaults(func=run)


def parse_soft_threshold(text: str) -> SoftThreshold:
    """``--space-soft-threshold``: ``PCT%``, ``SIZE`` or both, comma-separated (``10%,2GiB``).
    What is not given is 0; ``0`` alone turns the threshold off."""
    fraction, min_bytes = 0.0, 0
    for part in (p.strip() for p in text.split(",")):
        if part.endswith("%"):
            try:
                percent = float(part[:-1])
            except ValueError:
                percent = -1.0
            if not 0.0 <= percent < 100.0:
                raise argparse.ArgumentTypeError(
                    f"{part!r} is not a percentage from 0 up to (not including) 100"
                )
            fraction = percent / 100.0
        else:
            try:
                min_bytes = parse_size(part)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(
                    f"{part!r}: give a percentage (10%), a size (2GiB) or both (10%,2GiB); {exc}"
                ) from exc
    return SoftThreshold(fraction, min_bytes)


def parse_interval(text: str) -> float:
    """``500ms``, ``1s`` or plain seconds (``0.5``), within the heartbeat bounds."""
    t = text.strip()
    try:
        seconds = float(t[:-2]) / 1000 if t.endswith("ms") else float(t.removesuffix("s"))
    except ValueError:
        seconds = -1.0
    if not MIN_HEARTBEAT_INTERVAL_S <= seconds <= MAX_HEARTBEAT_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a duration from {MIN_HEARTBEAT_INTERVAL_S * 1000:g}ms to "
            f"{MAX_HEARTBEAT_INTERVAL_S:g}s, e.g. 500ms"
        )
    return seconds


def parse_masters(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    masters = tuple(m.strip() for m in text.split(",") if m.strip())
    for m in masters:
        parse_address(m, option="--master")
    return masters


def run(args: argparse.Namespace) -> int:
    try:
        config = DaemonConfig(
            data_dir=args.data_dir,
            iscsi_listen=tuple(
                parse_address(a, option="--iscsi-listen") for a in args.iscsi_listen
            ),
            api_listen=parse_address(args.api_listen, option="--api-listen"),
            replication_listen=(
                None
                if args.replication_listen is None
                else parse_address(args.replication_listen, option="--replication-listen")
            ),
            replication_advertise=args.replication_advertise,
            metrics_listen=(
                None
                if args.metrics_listen is None
                else parse_address(args.metrics_listen, option="--metrics-listen")
            ),
            space_threshold=args.space_soft_threshold,
            iqn_prefix=args.iqn_prefix,
            advertise_host=args.advertise_host,
            shutdown_timeout_s=args.shutdown_timeout,
            api_security=tls.from_args(args),
            masters=parse_masters(args.master),
            zone=args.zone,
            heartbeat_interval_s=args.heartbeat_interval,
        )
    except ValueError as exc:  # TlsConfigError is one too
        print(f"blockyard serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config.shutdown_timeout_s <= 0:
        print("blockyard serve: error: --shutdown-timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    # gRPC's asyncio support runs on the standard event loop; uvloop is not used here.
    return asyncio.run(serve(config))


def dump_tasks() -> None:
    """SIGUSR2: log where every task of the event loop waits (for a server that seems stuck:
    ``kill -USR2 PID``, then read its log)."""
    tasks = asyncio.all_tasks()
    out = io.StringIO()
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.write(f"--- {task.get_name()} ({task.get_coro()!r})\n")
        # Not Task.print_stack: on 3.11 it fails on frames whose line number is None.
        for frame in task.get_stack(limit=16):
            code = frame.f_code
            out.write(f"    {code.co_filename}:{frame.f_lineno} in {code.co_name}\n")
    log.warning("SIGUSR2: %d tasks\n%s", len(tasks), out.getvalue())


async def serve(config: DaemonConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    daemon = VolumeServerDaemon(config)
    try:
        await daemon.start()
    except StartError as exc:
        print(f"blockyard serve: error: {exc}", file=sys.stderr)
        # Plaintext off loopback without --insecure is a usage error, like a bad address.
        return EXIT_USAGE if isinstance(exc.__cause__, TlsConfigError) else EXIT_ERROR
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, dump_tasks)
    print(daemon.ready_line(), flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
    log.info("stopping: flushing volumes within %.0f s", config.shutdown_timeout_s)
    try:
        async with asyncio.timeout(config.shutdown_timeout_s):
            await daemon.close()
    except TimeoutError:
        print(
            f"blockyard serve: error: shutdown took longer than {config.shutdown_timeout_s} s; "
            "some volumes may not have been flushed (their WAL replays at the next start)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0
