"""``blockyard bench``: benchmarks that print ratios against a peer measured in the same run."""

from __future__ import annotations

import argparse
import random

from blockyard.bench.attach import run_attach_bench
from blockyard.bench.engine import run_engine_bench
from blockyard.bench.failover import run_failover_bench
from blockyard.bench.iscsi import run_iscsi_bench
from blockyard.bench.replication import run_replication_bench
from blockyard.bench.replication_report import Options
from blockyard.cli.sizes import parse_size


def register(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser("bench", help="run a benchmark beside its peer and print ratios")
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    sp = sub.add_parser("engine", help="volume engine vs raw pwrite/pread on a plain file")
    sp.add_argument("--dir", help="where to put the files (default: a temp dir in /var/tmp)")
    sp.add_argument("--size", default="1GiB", help="volume and raw file size (default 1GiB)")
    sp.add_argument("--seconds", type=float, default=2.0, help="rough time per workload")
    sp.set_defaults(func=_engine)
    sp = sub.add_parser("iscsi", help="blockyard's iSCSI target vs tgtd, same run")
    sp.add_argument("--dir", help="where to put the files (default: a temp dir in /var/tmp)")
    sp.add_argument("--size", default="1GiB", help="volume size for both targets")
    sp.add_argument("--seconds", type=int, default=10, help="duration of each read workload")
    sp.add_argument("--writes", type=int, default=50000, help="4 KiB writes per target")
    sp.set_defaults(func=_iscsi)
    sp = sub.add_parser("attach", help="attached /dev/loopN vs raw file vs qemu-img iscsi://")
    sp.add_argument("--dir", help="where to put the files (default: a temp dir in /var/tmp)")
    sp.add_argument("--size", default="1GiB", help="volume and raw file size")
    sp.add_argument("--seconds", type=int, default=6, help="duration of each fio job")
    sp.set_defaults(func=_attach)
    sp = sub.add_parser(
        "replication", help="RF1/RF2/RF3 write cost, delta resync, rebuild, degraded mode"
    )
    sp.add_argument("--dir", help="where to put the servers (default: a temp dir in /var/tmp)")
    sp.add_argument("--size", default="1GiB", help="size of the write-cost volumes")
    sp.add_argument("--rebuild-size", default="1GiB", help="size of the rebuilt volumes")
    sp.add_argument("--seconds", type=float, default=2.0, help="rough time per figure per round")
    sp.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    sp.add_argument(
        "--missed-writes", type=int, default=10_000, help="writes a killed replica misses"
    )
    sp.add_argument("--sparse-percent", type=int, default=10, help="allocated part, sparse rebuild")
    sp.add_argument("--skip-rf3", action="store_true", help="no RF3 sync_quorum setup")
    sp.add_argument("--skip-delta", action="store_true", help="no delta resync phase")
    sp.add_argument("--skip-rebuild", action="store_true", help="no full rebuild phase")
    sp.add_argument("--skip-degraded", action="store_true", help="no degraded phase")
    sp.add_argument(
        "--sync-timeout", type=float, default=300.0, help="longest wait for a replica (s)"
    )
    sp.add_argument(
        "--replica-dir",
        help="data of replica servers 1 and 2 here (e.g. /dev/shm: no shared disk, diagnosis)",
    )
    sp.set_defaults(func=_replication)
    sp = sub.add_parser("failover", help="kill -9 a volume's primary: time to the first I/O")
    sp.add_argument("--dir", help="where to put the cluster (default: a temp dir in /var/tmp)")
    sp.add_argument("--kills", type=int, default=10, help="primaries to kill (default 10)")
    sp.add_argument("--seed", type=int, default=None, help="replay a run (printed at start)")
    sp.add_argument("--qd", type=int, default=8, help="I/O threads (queue depth, default 8)")
    sp.set_defaults(func=_failover)


def _failover(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    return run_failover_bench(args.dir, kills=args.kills, seed=seed, threads=args.qd)


def _engine(args: argparse.Namespace) -> int:
    print(run_engine_bench(args.dir, size_bytes=parse_size(args.size), seconds=args.seconds))
    return 0


def _iscsi(args: argparse.Namespace) -> int:
    print(
        run_iscsi_bench(
            args.dir, size_bytes=parse_size(args.size), seconds=args.seconds, writes=args.writes
        )
    )
    return 0


def _attach(args: argparse.Namespace) -> int:
    print(run_attach_bench(args.dir, size_bytes=parse_size(args.size), seconds=args.seconds))
    return 0


def _replication(args: argparse.Namespace) -> int:
    options = Options(
        size_bytes=parse_size(args.size),
        rebuild_size_bytes=parse_size(args.rebuild_size),
        seconds=args.seconds,
        rounds=args.rounds,
        missed_writes=args.missed_writes,
        sparse_percent=args.sparse_percent,
        rf3=not args.skip_rf3,
        delta=not args.skip_delta,
        rebuild=not args.skip_rebuild,
        degraded=not args.skip_degraded,
        sync_timeout_s=args.sync_timeout,
        replica_dir=args.replica_dir,
    )
    run_replication_bench(args.dir, options, on_report=lambda r: print(r, flush=True))
    return 0
