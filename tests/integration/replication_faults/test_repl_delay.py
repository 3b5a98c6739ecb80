"""A slow replication link (200 ms each way through the fault proxy) with real `blockyard serve`
processes: sync_all flushes and FUA writes wait for the replica and succeed with it durable; the
replica stays in sync throughout (a slow link is not a failed one)."""

from __future__ import annotations

import threading
import time

from fault_helpers import LBAS_PER_BLOCK, Model, Rig, block

from blockyard.testing.faultproxy import Direction

DELAY_S = 0.2
ROUNDS = 6


def test_flushes_and_fua_writes_wait_for_the_replica_over_a_slow_link(rig: Rig) -> None:
    rig.proxy.set_delay(DELAY_S, Direction.BOTH)
    model = Model(rig.attach())
    seen_states: list[tuple[str, bool]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            rep = rig.report()
            seen_states.append((rep.state, rep.in_sync))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    latencies: list[float] = []
    try:
        for r in range(ROUNDS):
            model.write_range(range(r * 16, r * 16 + 15))
            last_write_started = time.monotonic()
            model.write(r * 16 + 15)
            lsn = rig.info().last_lsn
            result = model.flush()
            assert result.error is None, result.error
            # The replica made it durable before the flush was acknowledged (it keeps the
            # primary's LSNs)...
            assert rig.replica_info().durable_lsn >= lsn, rig.log_tails()
            # ...and that took a round trip on the slow link after the last write left.
            assert result.ended_s - last_write_started >= 2 * DELAY_S, result
            latencies.append(result.latency_s)
            # A FUA write is a durability point of its own.
            b = 500 + r
            data = block(b, 10_000 + r)
            started = time.monotonic()
            model.dev.write(b * LBAS_PER_BLOCK, data, fua=True)
            model.blocks[b] = data
            assert time.monotonic() - started >= 2 * DELAY_S
            assert rig.replica_info().durable_lsn >= rig.info().last_lsn
            latencies.append(time.monotonic() - started)
    finally:
        stop.set()
        watcher.join(10.0)
    print(
        f"{DELAY_S * 1000:.0f} ms each way: flush/FUA latencies "
        f"{[round(x, 3) for x in latencies]} s"
    )
    assert seen_states, "the watcher saw nothing"
    assert set(seen_states) == {("in_sync", True)}, sorted(set(seen_states))
    assert rig.file_in_sync()
    assert "marking replica" not in rig.log(rig.primary)
    last = rig.info().last_lsn
    rig.wait_report(lambda r: r.acked_lsn >= last, f"acknowledged up to LSN {last}", 30.0)
    model.verify()
    rig.assert_same_bytes()
