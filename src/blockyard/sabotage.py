"""Deliberate defects, for the chaos harness's self-test only (docs/reliability.md).

A checker is only worth what it catches: ``blockyard chaos --sabotage NAME`` starts the cluster
with ``BLOCKYARD_SABOTAGE=NAME`` in its processes' environment, and each named defect below is
then live in them, so the self-test can show the run fails on it. Nothing sets the variable
otherwise; a process that has it says so on stderr at start.
"""

from __future__ import annotations

import os
import sys
from typing import Final

ENV: Final = "BLOCKYARD_SABOTAGE"
#: A replica acknowledges every record but loses the data of every 100th WRITE it receives
#: (it logs zeros instead).
REPLICA_DROPS_RECORDS: Final = "replica-drops-records"
#: A primary completes writes and flushes at once, without waiting for any replica's
#: receipt or barrier: the acknowledgement comes before the copies hold the data.
ACK_BEFORE_BARRIER: Final = "ack-before-barrier"
#: The master fails a volume over without raising its epoch: the promoted copy serves in the
#: epoch of the primary it replaced, so nothing fences the old one.
LOSE_EPOCH_BUMP: Final = "lose-epoch-bump"
KNOWN: Final = (REPLICA_DROPS_RECORDS, ACK_BEFORE_BARRIER, LOSE_EPOCH_BUMP)
#: One replicated WRITE in this many is lost under REPLICA_DROPS_RECORDS.
DROP_EVERY: Final = 100


def _parse(text: str) -> frozenset[str]:
    return frozenset(n.strip() for n in text.split(",") if n.strip())


_ACTIVE: Final = _parse(os.environ.get(ENV, ""))


def active(name: str) -> bool:
    return name in _ACTIVE


def announce() -> None:
    """Say on stderr which defects this process carries (called once at start)."""
    if _ACTIVE:
        print(f"blockyard: SABOTAGED by {ENV}: {', '.join(sorted(_ACTIVE))}", file=sys.stderr,
              flush=True)  # fmt: skip
