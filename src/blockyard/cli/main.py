"""Entry point: ``blockyard <verb> ...``. Errors print one line saying what and how to fix."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from blockyard.cli import attach, bench, csi, serve, volume
from blockyard.errors import BlockyardError

#: Exit codes: 0 success, 1 operating error (message says how to fix), 2 usage error.
EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockyard", description="Replicated block storage for Kubernetes."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    volume.register(verbs)
    bench.register(verbs)
    attach.register(verbs)
    serve.register(verbs)
    csi.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        rc: int = args.func(args)
    except BlockyardError as exc:
        print(f"blockyard: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return rc


if __name__ == "__main__":
    sys.exit(main())
