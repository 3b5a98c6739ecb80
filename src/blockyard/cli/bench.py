"""``blockyard bench``: benchmarks that print ratios against a peer measured in the same run."""

from __future__ import annotations

import argparse

from blockyard.bench.attach import run_attach_bench
from blockyard.bench.engine import run_engine_bench
from blockyard.bench.iscsi import run_iscsi_bench
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
