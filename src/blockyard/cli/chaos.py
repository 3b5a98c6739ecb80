"""``blockyard chaos``: a seeded fault-injection run against a whole local cluster, with a
block-level consistency checker.

It starts its own cluster under DIR (a master with a SQLite store, or with --masters N a master
group electing its leader through etcd, and N volume servers, each server in its own network
namespace when partitions are asked for and this runs as root),
creates and attaches the volumes through blockyard's userspace initiator, and runs several
writers per volume: writes of 512 B to 1 MiB (aligned and unaligned), FUA, WRITE SAME, UNMAP,
flushes and checked reads, every block stamped with its volume, LBA and write. It then injects
the faults of the seeded schedule one at a time (kill -9 and restart of a server, SIGSTOP and
SIGCONT, a server's link taken down, kill -9 of the master or of a group's leader, the links to
a replica delayed, a primary killed while a replica lags, a server cut from the master only, a
server restarted with its monotonic clock hours or days off, a server's disk filled),
waits after each for the cluster to heal, has every writer read back its blocks, and at the end
reads every block through the primary and compares every replica's copy with it.

Checks: 1 no acknowledged-durable write lost; 2 no torn, misplaced or invented data; 3 no block
going back in time between quiet reads; 4 one primary per epoch, epochs never going down; 5
every volume heals within the bound; 6 I/O unavailability per fault (measured); 7 replicas
identical to the primary. Exit 0 when every check held, 1 when one failed, 2 on bad usage.
The same seed gives the same faults and the same workload choices; the timing of real
processes varies. See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import tempfile
from pathlib import Path

from blockyard import sabotage
from blockyard.chaos.runner import HEAL_BOUND_S, LAYOUTS, ChaosOptions, run_chaos
from blockyard.chaos.schedule import KINDS
from blockyard.cli.master import parse_duration
from blockyard.cli.sizes import parse_size

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
#: A master group larger than this adds nothing a chaos run on one machine can show.
MAX_MASTERS = 5


def _faults(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown fault {', '.join(unknown) or '(none)'}: choose from {','.join(KINDS)}"
        )
    return kinds


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "chaos",
        help="fault-injection run against a local cluster, checking no acknowledged write is lost",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=int, help="seed of the faults and the workload (default: random)")
    p.add_argument(
        "--duration",
        type=parse_duration,
        default=300.0,
        metavar="DURATION",
        help="how long to inject faults, e.g. 90s, 5m (default 5m)",
    )
    p.add_argument("--volumes", type=int, default=2, help="volumes (default 2)")
    p.add_argument(
        "--faults",
        type=_faults,
        default=KINDS,
        metavar="KIND,...",
        help=f"faults to inject (default all: {','.join(KINDS)})",
    )
    p.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="mixed",
        help="copies and durability of the volumes: mixed alternates RF2 sync_all "
        "and RF3 sync_quorum (default mixed)",
    )
    p.add_argument("--writers", type=int, default=3, help="writer threads per volume (default 3)")
    p.add_argument(
        "--volume-size",
        type=parse_size,
        default=64 << 20,
        metavar="SIZE",
        help="size of each volume (default 64MiB)",
    )
    p.add_argument("--servers", type=int, default=3, help="volume servers (default 3)")
    p.add_argument(
        "--masters",
        type=int,
        default=1,
        help="masters: 1 on SQLite (default), or 2 to 5 on etcd electing a leader (master "
        "faults then kill the leader)",
    )
    p.add_argument(
        "--heal-bound",
        type=parse_duration,
        default=HEAL_BOUND_S,
        metavar="DURATION",
        help=f"check 5: time a volume may take to heal after a fault (default {HEAL_BOUND_S:.0f}s)",
    )
    p.add_argument(
        "--no-netns",
        action="store_true",
        help="run every process on loopback (partitions are then not run)",
    )
    p.add_argument(
        "--dir",
        help="cluster directory, kept for its logs (default: a new directory under /var/tmp)",
    )
    p.add_argument("--report", type=Path, metavar="FILE", help="also write the report as JSON")
    p.add_argument(
        "--sabotage",
        choices=sabotage.KNOWN,
        action="append",
        default=[],
        help="self-test: start the cluster with this deliberate defect, which the "
        "run must then catch (see docs/reliability.md)",
    )
    p.set_defaults(func=run)  # fmt: skip


def _log_to(path: Path) -> None:
    """The harness's own log (the initiator's path changes, expected by the hundred under
    faults) goes to a file beside the servers' logs, not to the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    for flag, value, least in (("--volumes", args.volumes, 1), ("--writers", args.writers, 1),
                               ("--servers", args.servers, 2)):  # fmt: skip
        if value < least:
            print(f"blockyard chaos: {flag} must be at least {least}", file=sys.stderr)
            return EXIT_USAGE
    if not 1 <= args.masters <= MAX_MASTERS:
        print(f"blockyard chaos: --masters must be 1 to {MAX_MASTERS}", file=sys.stderr)
        return EXIT_USAGE
    if args.dir:
        directory = Path(args.dir)
    else:
        directory = Path(tempfile.mkdtemp(prefix="blockyard-chaos-", dir="/var/tmp"))
    if directory.exists() and any(directory.iterdir()):
        print(f"blockyard chaos: {directory} is not empty; give a new or empty --dir",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    _log_to(directory / "chaos.log")
    if args.sabotage:
        print(f"blockyard chaos: self-test with deliberate defects: {', '.join(args.sabotage)}")
    print(f"blockyard chaos: seed {seed}, {args.duration:.0f} s of faults "
          f"({','.join(args.faults)}), {args.volumes} volumes, directory {directory}",
          flush=True)  # fmt: skip
    options = ChaosOptions(
        seed=seed, duration_s=args.duration, directory=directory, volumes=args.volumes,
        faults=args.faults, writers=args.writers, volume_bytes=args.volume_size,
        servers=args.servers, masters=args.masters, layout=args.layout,
        netns=False if args.no_netns else None,
        heal_bound_s=args.heal_bound, sabotage=tuple(args.sabotage), out=sys.stdout,
    )  # fmt: skip
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the processes, namespaces and
    # links this run made are removed rather than left to shadow the next run.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_chaos(options)
    except ValueError as exc:
        print(f"blockyard chaos: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("blockyard chaos: interrupted; the cluster was stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report.table(), flush=True)
    if args.report is not None:
        args.report.write_text(report.to_json() + "\n")
    return 0 if report.ok() else EXIT_FAILED
