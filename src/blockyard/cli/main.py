"""Entry point: ``blockyard <verb> ...``. Errors print one line saying what and how to fix."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from blockyard import sabotage
from blockyard.errors import BlockyardError, TlsConfigError

#: Exit codes: 0 success, 1 operating error (message says how to fix), 2 usage error.
EXIT_ERROR = 1
EXIT_USAGE = 2
#: gRPC's C core writes INFO lines (one per failed TLS handshake, for one) straight to stderr,
#: outside the logging configuration: a CLI error would no longer be one line, and a server
#: could be made to log one line per hostile connection. GRPC_VERBOSITY=INFO brings them back.
#: It is read once, when grpc is first imported, so it is set before any verb module loads.
GRPC_VERBOSITY_DEFAULT = "ERROR"


def build_parser() -> argparse.ArgumentParser:
    os.environ.setdefault("GRPC_VERBOSITY", GRPC_VERBOSITY_DEFAULT)
    # The verb modules import grpc: only after the line above.
    from blockyard.cli import (  # noqa: PLC0415
        attach,
        bench,
        chaos,
        csi,
        master,
        serve,
        up,
        volume,
        volume_master,
    )

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
    master.register(verbs)
    volume_master.register(verbs)
    up.register(verbs)
    chaos.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sabotage.announce()
    try:
        rc: int = args.func(args)
    except TlsConfigError as exc:
        print(f"blockyard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BlockyardError as exc:
        print(f"blockyard: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return rc


if __name__ == "__main__":
    sys.exit(main())
