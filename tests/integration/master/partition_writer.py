"""A writer for the partition test, run inside the isolated primary's network namespace
(``ip netns exec NS python partition_writer.py PORTAL IQN OUT SECONDS [FLUSH_EVERY]``): it
writes 4 KiB blocks through blockyard's userspace initiator to one portal (flushing every
FLUSH_EVERY writes; by default never: a sync_all flush waits for the unreachable replica, and
plain writes are what only the lease stops), and appends one line per completed command to
OUT, so the test knows when the isolated primary last acknowledged anything:

- ``w <monotonic>`` a write completed, ``f <monotonic>`` a flush completed;
- ``e <monotonic> <error>`` a command failed.

CLOCK_MONOTONIC is one clock for every process on the machine, whatever its namespace, so the
test compares these times with its own. Each line is flushed as it is written (the test reads
the file while this runs and after SIGKILL)."""

from __future__ import annotations

import sys
import time

from blockyard.attach.initiator import IscsiBlockDevice, IscsiVolumeSpec, parse_portal
from blockyard.errors import BlockyardError

INITIATOR_NAME = "iqn.2026-11.io.blockyard.test:partition-isolated"
#: How long one command may wait for a usable path before it fails: short, so a fenced
#: primary's refusals show up as errors instead of one write parked for the whole test.
REPLACEMENT_TIMEOUT_S = 3.0
SECTORS_PER_BLOCK = 8
BLOCKS = 256


def main() -> int:
    portal, iqn, out_path, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    flush_every = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    spec = IscsiVolumeSpec(
        portals=(parse_portal(portal),),
        target_name=iqn,
        initiator_name=INITIATOR_NAME,
        replacement_timeout_s=REPLACEMENT_TIMEOUT_S,
    )
    end = time.monotonic() + seconds
    with open(out_path, "a", buffering=1) as out:
        device = IscsiBlockDevice(spec)
        try:
            n = 0
            while time.monotonic() < end:
                block = n % BLOCKS
                payload = (n.to_bytes(8, "little") * 512)[:4096]
                try:
                    device.write(block * SECTORS_PER_BLOCK, payload)
                    out.write(f"w {time.monotonic():.6f}\n")
                    if flush_every and n % flush_every == flush_every - 1:
                        device.flush()
                        out.write(f"f {time.monotonic():.6f}\n")
                except BlockyardError as exc:
                    text = str(exc).replace("\n", " ")[:200]
                    out.write(f"e {time.monotonic():.6f} {type(exc).__name__}: {text}\n")
                    time.sleep(0.05)
                n += 1
        finally:
            device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
