"""Fuzz: no CDB or parameter list makes execute() raise, and no write lands out of bounds.

Mirrors h11's invariant: whatever garbage arrives, the answer is a protocol-correct result.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scsi_support import I1, I2, VOLUME_UUID, Harness

from blockyard.scsi import LogicalUnit, LuIdentity, ScsiResult, Status
from blockyard.scsi.commands import COMMANDS
from blockyard.testing.memdev import MemoryBlockDevice

BLOCKS = 64
KNOWN_OPCODES = sorted({c.opcode for c in COMMANDS})


class _BoundsCheckingDevice(MemoryBlockDevice):
    def write(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        assert lba >= 0 and lba + len(data) // 512 <= self.block_count, (lba, len(data))
        super().write(lba, data, fua=fua)

    def unmap(self, lba: int, block_count: int) -> None:
        assert lba >= 0 and lba + block_count <= self.block_count, (lba, block_count)
        super().unmap(lba, block_count)


def _harness() -> Harness:
    h = Harness(BLOCKS)
    h.device = _BoundsCheckingDevice(BLOCKS)
    h.lu = LogicalUnit(h.device, LuIdentity(VOLUME_UUID), h.alua, h.store)
    return h


cdbs = st.one_of(
    st.binary(min_size=0, max_size=20),
    st.tuples(
        st.sampled_from(KNOWN_OPCODES),
        st.integers(0, 0x1F) | st.integers(0, 255),
        st.binary(min_size=4, max_size=15),
    ).map(lambda t: bytes([t[0], t[1]]) + t[2]),
)


def _check(result: ScsiResult) -> None:
    assert isinstance(result, ScsiResult)
    assert isinstance(result.status, Status)
    if result.status == Status.CHECK_CONDITION:
        assert result.sense is not None and len(result.sense) == 18


@settings(max_examples=300, deadline=None)
@given(
    commands=st.lists(
        st.tuples(cdbs, st.none() | st.binary(max_size=1200), st.booleans()), max_size=6
    )
)
def test_random_cdbs_never_raise(commands: list[tuple[bytes, bytes | None, bool]]) -> None:
    h = _harness()
    for cdb, data, second in commands:
        info = h.lu.inspect(cdb)
        assert info.data_out_bytes >= 0
        if data is None and info.data_out_bytes:
            data = bytes(info.data_out_bytes)
        _check(h.lu.execute(I2 if second else I1, cdb, data))
