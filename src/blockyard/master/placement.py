"""Where a volume's copies go (pure).

Policy, in order:

1. Never two copies of one volume on one server.
2. Only servers that are alive (heard within the suspect window), not draining, in the
   requested zones when some are named, and with room: reported free bytes of at least the
   volume's size. Volumes are sparse files, but a copy that may fill up must fit, or its
   writes fail later with no space on a server that was known to be short.
3. Spread across zones: a candidate in a zone holding fewer of this volume's copies wins.
4. Then the fewest bytes provisioned by the master (the full size of every copy placed there,
   in-flight creates included), so a server that was just given a large volume is not picked
   again before its usage shows in heartbeats.
5. Then the server id, so equal servers are chosen the same way every time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    server_id: str
    zone: str
    free_bytes: int
    provisioned_bytes: int
    usable: bool = True


def rank(
    candidates: Iterable[Candidate],
    size_bytes: int,
    *,
    exclude: Collection[str] = (),
    taken_zones: Sequence[str] = (),
    zones: Collection[str] = (),
) -> list[str]:
    """Every acceptable server for one more copy, best first. ``exclude``: servers that hold a
    copy already or refused one; ``taken_zones``: the zones of the copies placed so far."""
    in_zone = Counter(taken_zones)
    ok = [
        c
        for c in candidates
        if c.usable
        and c.server_id not in exclude
        and c.free_bytes >= size_bytes
        and (not zones or c.zone in zones)
    ]
    ok.sort(key=lambda c: (in_zone[c.zone], c.provisioned_bytes, c.server_id))
    return [c.server_id for c in ok]


def place(
    candidates: Sequence[Candidate],
    size_bytes: int,
    count: int,
    *,
    exclude: Collection[str] = (),
    zones: Collection[str] = (),
) -> list[str]:
    """Up to ``count`` servers for a new volume's copies (fewer when not enough qualify)."""
    by_id = {c.server_id: c for c in candidates}
    chosen: list[str] = []
    for _ in range(count):
        best = rank(
            candidates,
            size_bytes,
            exclude={*exclude, *chosen},
            taken_zones=[by_id[s].zone for s in chosen],
            zones=zones,
        )
        if not best:
            break
        chosen.append(best[0])
    return chosen
