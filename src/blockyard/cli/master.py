"""``blockyard master``: run the master (placement, heartbeats, leases, failover).

Serves ``blockyard.v1.Master`` on ``--listen`` and keeps its state in ``--store``
(``sqlite:///PATH`` for one master, ``etcd://HOST:PORT[,...]`` for several with leader
election). Prints ``READY master=HOST:PORT id=ID role=leader|follower`` on stdout once serving
(ending with ``metrics=http://HOST:PORT/metrics`` with ``--metrics-listen``).
SIGTERM or SIGINT stops it within ``--shutdown-timeout``.

With ``--tls-cert``/``--tls-key``/``--tls-ca`` the master serves its API with mutual TLS
(every client, volume servers included, must present a certificate signed by ``--tls-ca``)
and dials every volume server's management API (to place copies and set roles) with the same
certificate, which therefore needs both extended key usages, serverAuth and clientAuth
(``--tls-server-name`` when the servers' certificates name another host than the one dialed).
Without them it serves and dials in plaintext, which off loopback needs ``--insecure``.

Exit codes: 0 after a clean stop, 1 when it cannot start or stop cleanly (the message says
why), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from typing import Final

from blockyard import tls
from blockyard.errors import StoreUrlError, TlsConfigError
from blockyard.master.core import MasterConfig
from blockyard.master.leases import LeasePolicy
from blockyard.master.process import MasterProcess, MasterProcessConfig, MasterStartError
from blockyard.server.daemon import parse_address

log = logging.getLogger("blockyard.cli.master")

EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
_UNITS_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")


def parse_duration(text: str) -> float:
    """``500ms``, ``2s``, ``10m``, ``1h`` or plain seconds; returns seconds."""
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive duration: write e.g. 500ms, 2s, 10m"
        )
    return float(m.group(1)) * _UNITS_S[m.group(2) or "s"]


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "master",
        help="run the master: placement, heartbeats, leases and failover",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="gRPC address")
    p.add_argument(
        "--store", required=True, metavar="URL", help="sqlite:///PATH or etcd://HOST:PORT[,...]"
    )
    for flag, default, text in (
        ("--lease-ttl", 2.0, "primary lease (default 2s)"),
        ("--heartbeat-interval", 0.5, "volume server heartbeat interval (default 500ms)"),
        ("--replace-after", 600.0, "replace a dead server's copies after this long (default 10m)"),
        ("--shutdown-timeout", 10.0, "bound on a graceful stop (default 10s)"),
    ):
        p.add_argument(flag, type=parse_duration, default=default, metavar="DURATION", help=text)
    p.add_argument("--master-id", default="", help="this master's id (default: random)")
    p.add_argument("--advertise", default="", metavar="HOST:PORT",
                   help="address clients and other masters use (default: --listen)")  # fmt: skip
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over plain HTTP here (port 0 = any free port)",
    )
    # One certificate for the master's own API and for dialing the volume servers' APIs
    # (it places copies and sets roles there): mutual TLS off loopback, both ways.
    tls.add_arguments(p, role="both")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        listen = parse_address(args.listen, option="--listen")
        config = MasterProcessConfig(
            listen=listen,
            store_url=args.store,
            lease_ttl_s=args.lease_ttl,
            heartbeat_interval_s=args.heartbeat_interval,
            replace_after_s=args.replace_after,
            master_id=args.master_id,
            shutdown_timeout_s=args.shutdown_timeout,
            advertise=args.advertise,
            metrics_listen=(
                None
                if args.metrics_listen is None
                else parse_address(args.metrics_listen, option="--metrics-listen")
            ),
            server_security=tls.from_args(args),
        )
        MasterConfig(
            "check",
            LeasePolicy.from_seconds(config.lease_ttl_s),
            int(config.heartbeat_interval_s * 1e9),
            int(config.replace_after_s * 1e9),
        )
        _check_store_url(args.store)
    except (ValueError, StoreUrlError, TlsConfigError) as exc:
        print(f"blockyard master: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(serve(config))


def _check_store_url(url: str) -> None:
    try:
        from blockyard.master.store_url import parse_store_url  # noqa: PLC0415
    except ImportError:
        return
    parse_store_url(url)


async def serve(config: MasterProcessConfig) -> int:
    proc = MasterProcess(config)
    try:
        await proc.start()
    except MasterStartError as exc:
        print(f"blockyard master: error: {exc}", file=sys.stderr)
        # Plaintext off loopback without --insecure is a usage error, like a bad address.
        return EXIT_USAGE if isinstance(exc.__cause__, TlsConfigError) else EXIT_ERROR
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(proc.ready_line(), flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    try:
        async with asyncio.timeout(config.shutdown_timeout_s + 1.0):
            await proc.close()
    except TimeoutError:
        print(
            f"blockyard master: error: shutdown took longer than {config.shutdown_timeout_s} s",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0
