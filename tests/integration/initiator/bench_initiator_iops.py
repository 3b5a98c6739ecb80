"""Benchmark: 4 KiB random I/O through IscsiBlockDevice from N threads.

Not a test (pytest does not collect it). Start a target, then point this at it::

    python -m blockyard.server.standalone --data-dir D --listen 127.0.0.1:0 --create v:256M
    # prints READY 127.0.0.1:PORT and TARGET iqn...:v
    .venv/bin/python tests/integration/initiator/bench_initiator_iops.py 127.0.0.1:PORT \\
        iqn.2026-11.io.blockyard:v [--threads 1 16] [--seconds 5] [--write]

Each thread loops ``readinto`` (or ``write``) of one 4 KiB block at a random aligned LBA for
``--seconds``; one line per thread count: IOPS and mean latency. Results are quoted in
docs/attach.md ("Over iSCSI").
"""

from __future__ import annotations

import argparse
import random
import threading
import time

from blockyard.attach.initiator.blockdev import IscsiBlockDevice

IO_BYTES = 4096


def run(dev: IscsiBlockDevice, threads: int, seconds: float, write: bool) -> tuple[float, float]:
    blocks = IO_BYTES // dev.logical_block_size
    slots = dev.block_count // blocks
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def work(index: int) -> None:
        rng = random.Random(index)
        buf = memoryview(bytearray(IO_BYTES))
        data = bytes(IO_BYTES)
        done = 0
        while time.monotonic() < stop:
            lba = rng.randrange(slots) * blocks
            if write:
                dev.write(lba, data)
            else:
                dev.readinto(lba, buf)
            done += 1
        counts[index] = done

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - start
    total = max(1, sum(counts))
    return total / elapsed, elapsed / total * threads * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("portal", help="HOST:PORT")
    parser.add_argument("iqn")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    with IscsiBlockDevice.connect([args.portal], args.iqn, "iqn.2026-11.io.blockyard:bench") as dev:
        for threads in args.threads:
            iops, latency_ms = run(dev, threads, args.seconds, args.write)
            kind = "write" if args.write else "read"
            print(f"4k rand{kind} threads={threads}: {iops:,.0f} IOPS, {latency_ms:.3f} ms/io")


if __name__ == "__main__":
    main()
