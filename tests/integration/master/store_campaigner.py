"""A master stand-in for the HA store tests, run as its own process (so it can be kill -9'd):
opens an etcd store, campaigns, and once leader creates ``item-0000``..``item-<n-1>`` the way
the master creates volumes (load, then put with ``expect_version=0`` what is missing), one at
a time. Reports on stdout, one line each, flushed:

    LEADER <token>            won the election
    ACK <item> <version>      a create the store acknowledged
    CONFLICT <item>           a create refused because the item exists (should never happen)
    FENCED                    a write refused because leadership ended (then exits 3)
    LOST                      leadership_lost fired (then exits 4)
    DONE                      every item exists

Usage: store_campaigner.py URL MASTER_ID ITEM_COUNT ELECTION_TTL_S
"""

from __future__ import annotations

import asyncio
import json
import sys

from blockyard.errors import StoreConflictError, StoreFencedError
from blockyard.master.store_url import make_store

#: Pause between creates, so a kill lands in the middle of the sequence.
CREATE_PAUSE_S = 0.05
#: How long a leader that is done stays leader (the test stops it before).
LINGER_S = 120.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def main(url: str, master_id: str, count: int, ttl_s: int) -> int:
    store = make_store(url, election_ttl_s=ttl_s)
    await store.open()
    try:
        await store.campaign(master_id, f"{master_id}.example:9400")
        leader = store.leader()
        say(f"LEADER {leader.token if leader else -1}")
        snapshot = await store.load()
        for i in range(count):
            name = f"item-{i:04d}"
            if name in snapshot.volumes:
                continue
            value = json.dumps({"by": master_id}).encode()
            try:
                version = await store.put("volumes", name, value, expect_version=0)
            except StoreConflictError:
                say(f"CONFLICT {name}")
                continue
            except StoreFencedError:
                say("FENCED")
                return 3
            say(f"ACK {name} {version}")
            await asyncio.sleep(CREATE_PAUSE_S)
        say("DONE")
        try:
            await asyncio.wait_for(store.leadership_lost.wait(), LINGER_S)
        except TimeoutError:
            return 0
        say("LOST")
        return 4
    finally:
        await store.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
