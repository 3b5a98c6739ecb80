"""A flaky replication link — reset, blackholed or stalled every few hundred milliseconds for a
few seconds — while a client writes and flushes (sync_all, real `blockyard serve` processes,
the userspace iSCSI initiator, seeded fault schedule). No flush fails or outlasts its bound, no
acknowledged write is lost, and the replica converges to the primary's bytes once the link is
steady. Short lossless stalls (hold) never cost the replica its in-sync mark."""

from __future__ import annotations

import random
import time

import pytest
from fault_helpers import FLUSH_BOUND_S, Model, Rig, Writer

FLAKY_FOR_S = 4.0
SEED = 20261204


def flap(rig: Rig, kind: str, rng: random.Random) -> int:
    """Fault the link every 0.2 to 0.4 s for FLAKY_FOR_S; returns how many faults."""
    faults = 0
    deadline = time.monotonic() + FLAKY_FOR_S
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.2, 0.4))
        faults += 1
        if kind == "cut":
            rig.proxy.cut()
            continue
        if kind == "blackhole":
            rig.proxy.blackhole()
        else:
            rig.proxy.hold()
        time.sleep(rng.uniform(0.05, 0.3))
        rig.proxy.heal()
    return faults


@pytest.mark.parametrize("kind", ["cut", "blackhole", "hold"])
def test_flaky_link_loses_no_acknowledged_write(rig: Rig, kind: str) -> None:
    rng = random.Random(f"{SEED}-{kind}")
    model = Model(rig.attach())
    writer = Writer(model, blocks=1024, flush_every=8, seed=rng.randrange(1 << 30))
    writer.start()
    try:
        writer.wait_writes(50)
        faults = flap(rig, kind, rng)
        rig.proxy.pass_through()
        writer.wait_writes(50)
        started = time.monotonic()
        rep = rig.wait_in_sync()
        converged_s = time.monotonic() - started
        writer.wait_writes(20)
    finally:
        writer.finish()
    latencies = sorted(f.latency_s for f in writer.flushes)
    marks = rig.log(rig.primary).count("marking replica")
    print(
        f"{kind}: {faults} faults, {writer.writes} writes, {len(writer.flushes)} flushes "
        f"(median {latencies[len(latencies) // 2]:.3f} s, max {latencies[-1]:.3f} s), "
        f"{marks} out-of-sync marks, in sync {converged_s:.1f} s after the link steadied "
        f"({rep.plan}: {rep.plan_reason})"
    )
    failed = [f for f in writer.flushes if f.error is not None]
    assert not failed, (failed, rig.log_tails())
    assert latencies[-1] <= FLUSH_BOUND_S, rig.log_tails()
    if kind == "hold":
        # Stalls far shorter than the barrier and dead-peer timeouts: nothing degrades.
        assert marks == 0, rig.log_tails()
    else:
        assert marks >= 1
    assert model.flush().error is None
    rig.wait_in_sync()
    model.verify()
    rig.assert_same_bytes()
