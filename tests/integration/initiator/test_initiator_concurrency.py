"""Several threads drive one IscsiBlockDevice at once (as the FUSE daemon's workers do):
every write is verified by a read, and the final state matches every thread's model."""

from __future__ import annotations

import random
import threading
import time

from initiator_targets import TargetProcess, open_device

THREADS = 8
OPS_PER_THREAD = 120
REGION_BLOCKS = 2048  # each thread owns a disjoint 1 MiB region: no overlapping writes
RUN_TIMEOUT_S = 90


def test_eight_threads_verified_random_io(target: TargetProcess) -> None:
    errors: list[BaseException] = []
    models: dict[int, bytearray] = {}
    with open_device(target.portals, "vol1") as device:
        lbs = device.logical_block_size

        def worker(index: int) -> None:
            rng = random.Random(index)
            base = index * REGION_BLOCKS
            model = bytearray(REGION_BLOCKS * lbs)
            models[index] = model
            try:
                for _ in range(OPS_PER_THREAD):
                    lba = rng.randrange(REGION_BLOCKS - 1)
                    count = rng.randint(1, min(256, REGION_BLOCKS - lba))
                    span = slice(lba * lbs, (lba + count) * lbs)
                    if rng.random() < 0.6:
                        data = rng.randbytes(count * lbs)
                        device.write(base + lba, data, fua=rng.random() < 0.1)
                        model[span] = data
                        assert device.read(base + lba, count) == data
                    else:
                        buf = bytearray(count * lbs)
                        device.readinto(base + lba, memoryview(buf))
                        assert buf == model[span], f"thread {index}: stale read at {lba}"
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(RUN_TIMEOUT_S - (time.monotonic() - started))
        assert not any(t.is_alive() for t in threads), "worker threads hung"
        assert not errors, errors[0]
        for index, model in models.items():
            got = b"".join(
                device.read(index * REGION_BLOCKS + off, 512)
                for off in range(0, REGION_BLOCKS, 512)
            )
            assert got == bytes(model), f"thread {index}'s region differs from its model"
