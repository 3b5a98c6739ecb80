"""Regression: PERSISTENT RESERVE OUT saved the reservation state (the file store fsyncs it)
while holding the logical unit's state lock, which the event loop takes for every fast-path
gate check and unit-attention look-up: a slow disk under one volume's reservation file stalled
every session of the server. Now the save runs under a lock of its own and the state lock is
taken only to publish the saved state."""

from __future__ import annotations

import threading

from scsi_support import I1, I2, Harness, pr_out

from blockyard.scsi import Status
from blockyard.scsi.reservations import MemoryReservationStore, PrState

WAIT_S = 10.0
REGISTER = 0


class StallingStore(MemoryReservationStore):
    """Its save blocks until released, like an fsync on a stalled disk."""

    def __init__(self) -> None:
        super().__init__()
        self.saving = threading.Event()
        self.release = threading.Event()

    def save(self, state: PrState) -> None:
        self.saving.set()
        assert self.release.wait(WAIT_S), "the test never released the save"
        super().save(state)


def test_the_state_lock_is_free_while_a_reservation_is_saved() -> None:
    h = Harness().ready(I1, I2)
    store = StallingStore()
    h.lu._store = store
    cdb, params = pr_out(REGISTER, 0, 0x1111)
    results: list[Status] = []
    writer = threading.Thread(target=lambda: results.append(h.run(cdb, params).status))
    writer.start()
    try:
        assert store.saving.wait(WAIT_S)
        gate = threading.Thread(target=h.lu.fast_gate, args=(I2,))
        gate.start()
        gate.join(2.0)
        assert not gate.is_alive(), "fast_gate waited for the reservation file's fsync"
        # Not in effect before it is saved.
        assert h.lu.reservation_state.find(I1.initiator_port_name, 1) is None
    finally:
        store.release.set()
        writer.join(WAIT_S)
    assert results == [Status.GOOD]
    assert h.lu.reservation_state.find(I1.initiator_port_name, 1) is not None
