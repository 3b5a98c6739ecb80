"""The conformance suite every :class:`~blockyard.blockdev.BlockDevice` must pass.

Call :func:`check_block_device` with a factory for fresh devices; it runs every check on its own
device and raises ``AssertionError`` naming the failed check. It uses nothing but the
``BlockDevice`` protocol, so the engine's volumes, an iSCSI-attached LUN, a FUSE-backed file and
a replicated volume are all held to the same contract. It does not need pytest.

A factory is either a callable returning a context manager that yields the device (a
``contextlib.contextmanager`` function, for instance) or a callable returning
``(device, cleanup)``. Each device must be fresh (never written) and at least
:data:`MIN_DEVICE_BYTES` large.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TypeAlias

from blockyard.blockdev import BlockDevice, BytesLike, LbaStatus
from blockyard.errors import MisalignedError, OutOfRangeError, TransferTooLargeError

#: The suite's large-range checks need this much room.
MIN_DEVICE_BYTES = 4 << 20
#: SBC-4 §6.6.2: the suite is written for 512-byte logical blocks.
LOGICAL_BLOCK_SIZE = 512
#: Large unmaps span this many bytes: above the engine's 1 MiB WAL-logged unmap limit.
LARGE_RANGE_BYTES = 2 << 20
#: Operations in the randomised model check.
RANDOM_OPS_COUNT = 300
RANDOM_SEED = 0x5EED

DeviceFactory: TypeAlias = Callable[
    [], AbstractContextManager[BlockDevice] | tuple[BlockDevice, Callable[[], None]]
]
_Check: TypeAlias = Callable[[BlockDevice], None]


@contextlib.contextmanager
def _fresh(factory: DeviceFactory) -> Iterator[BlockDevice]:
    made = factory()
    if isinstance(made, tuple):
        device, cleanup = made
        try:
            yield device
        finally:
            cleanup()
    else:
        with made as device:
            yield device


def _pattern(tag: int, block_count: int) -> bytes:
    """Distinct, non-zero content per (tag, block) so misplaced or stale blocks are caught."""
    out = bytearray()
    for i in range(block_count):
        head = f"tag={tag:08x} block={i:08x}|".encode()
        out += (head * (LOGICAL_BLOCK_SIZE // len(head) + 1))[:LOGICAL_BLOCK_SIZE]
    return bytes(out)


def _describe(data: bytes, expected: bytes) -> str:
    for i in range(0, max(len(data), len(expected)), LOGICAL_BLOCK_SIZE):
        got = data[i : i + LOGICAL_BLOCK_SIZE]
        want = expected[i : i + LOGICAL_BLOCK_SIZE]
        if got != want:
            what = "zeros" if not any(got) else repr(got[:32])
            return (
                f"first difference in block +{i // LOGICAL_BLOCK_SIZE}: got {what}, "
                f"expected {'zeros' if not any(want) else repr(want[:32])}"
            )
    return "no difference"


def _write(device: BlockDevice, lba: int, data: bytes | bytearray, *, fua: bool = False) -> None:
    """Write ``data`` in requests no larger than the device accepts."""
    step = device.max_transfer_blocks * LOGICAL_BLOCK_SIZE
    for off in range(0, len(data), step):
        device.write(lba + off // LOGICAL_BLOCK_SIZE, data[off : off + step], fua=fua)


def _in_chunks(device: BlockDevice, op: Callable[[int, int], object], lba: int, count: int) -> None:
    """Apply an unmap-like ``op`` in requests no larger than the device accepts."""
    step = device.max_transfer_blocks
    for off in range(0, count, step):
        op(lba + off, min(step, count - off))


def _read(device: BlockDevice, lba: int, count: int) -> bytes:
    step = device.max_transfer_blocks
    return b"".join(device.read(lba + off, min(step, count - off)) for off in range(0, count, step))


def _expect_read(device: BlockDevice, lba: int, expected: bytes, what: str) -> None:
    count = len(expected) // LOGICAL_BLOCK_SIZE
    if count > device.max_transfer_blocks:
        data = _read(device, lba, count)
    else:
        data = device.read(lba, count)
    assert isinstance(data, bytes), f"{what}: read returned {type(data).__name__}, not bytes"
    assert len(data) == len(expected), (
        f"{what}: read({lba}, {count}) returned {len(data)} bytes, expected {len(expected)}"
    )
    assert data == expected, f"{what}: read({lba}, {count}) is wrong: {_describe(data, expected)}"


def _expect_error(
    error: type[Exception] | tuple[type[Exception], ...],
    what: str,
    call: Callable[[], object],
) -> None:
    names = error.__name__ if isinstance(error, type) else " or ".join(e.__name__ for e in error)
    try:
        call()
    except error as exc:
        assert str(exc), f"{what}: {type(exc).__name__} has no message saying what to fix"
        return
    except Exception as exc:
        raise AssertionError(f"{what}: expected {names}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"{what}: expected {names}, but the call succeeded")


def _expect_status(device: BlockDevice, lba: int, *, mapped: bool, what: str) -> None:
    status = device.lba_status(lba)
    assert isinstance(status, LbaStatus), f"{what}: lba_status returned {status!r}"
    assert status.lba == lba, f"{what}: lba_status({lba}) describes LBA {status.lba}"
    assert status.block_count >= 1, f"{what}: lba_status({lba}) reports an empty run {status}"
    assert status.lba + status.block_count <= device.block_count, (
        f"{what}: lba_status({lba}) run {status} reaches past the last LBA {device.block_count - 1}"
    )
    state = "mapped" if mapped else "deallocated"
    assert status.mapped is mapped, f"{what}: LBA {lba} should be {state}, got {status}"


def _per_physical(device: BlockDevice) -> int:
    return device.physical_block_size // device.logical_block_size


# ---- checks ---------------------------------------------------------------------------------


def check_geometry(device: BlockDevice) -> None:
    assert isinstance(device, BlockDevice), f"{device!r} does not implement BlockDevice"
    lbs = device.logical_block_size
    pbs = device.physical_block_size
    assert lbs == LOGICAL_BLOCK_SIZE, f"logical_block_size is {lbs}, expected 512"
    assert pbs >= lbs and pbs % lbs == 0, (
        f"physical_block_size {pbs} is not a whole multiple of the logical block size {lbs}"
    )
    assert device.block_count > 0, f"block_count is {device.block_count}"
    assert device.block_count * lbs >= MIN_DEVICE_BYTES, (
        f"the suite needs a device of at least {MIN_DEVICE_BYTES} bytes, got "
        f"{device.block_count * lbs}; make the factory build a bigger one"
    )
    assert device.max_transfer_blocks >= 8, (
        f"max_transfer_blocks is {device.max_transfer_blocks}; at least 8 (4 KiB) is required"
    )


def check_never_written_reads_zeros(device: BlockDevice) -> None:
    last = device.block_count - 1
    for lba, count in ((0, 8), (1, 1), (device.block_count // 2, 64), (last, 1)):
        _expect_read(device, lba, bytes(count * LOGICAL_BLOCK_SIZE), "never-written blocks")


def check_read_after_write(device: BlockDevice) -> None:
    per = _per_physical(device)
    last = device.block_count - 1
    cases = [
        ("first LBA", 0, 1),
        ("aligned physical block", 8 * per, per),
        ("several aligned blocks", 16 * per, 4 * per),
        ("last LBA", last, 1),
        ("last physical block", device.block_count - per, per),
    ]
    for tag, (what, lba, count) in enumerate(cases, start=1):
        data = _pattern(tag, count)
        _write(device, lba, data)
        _expect_read(device, lba, data, f"read after write ({what})")
    _expect_read(device, 1, bytes(LOGICAL_BLOCK_SIZE), "the LBA after a 1-sector write at LBA 0")


def check_sub_block_writes_keep_neighbours(device: BlockDevice) -> None:
    """Writes smaller than a physical block must not disturb the rest of that block."""
    per = _per_physical(device)
    cases = [
        ("one sector inside a physical block", 3, 1),
        ("first sector of a physical block", 0, 1),
        ("last sector of a physical block", per - 1, 1),
        ("spanning two physical blocks", per - 2, 4),
        ("unaligned start and end over many blocks", 1, 3 * per + 2),
    ]
    for tag, (what, offset, count) in enumerate(cases, start=60):
        base = tag * 8 * per
        background = _pattern(tag, 6 * per)
        _write(device, base, background)
        model = bytearray(background)
        data = _pattern(tag + 100, count)
        _write(device, base + offset, data)
        model[offset * LOGICAL_BLOCK_SIZE : (offset + count) * LOGICAL_BLOCK_SIZE] = data
        _expect_read(device, base, bytes(model), f"sub-block write ({what})")


def check_write_accepts_buffer_types(device: BlockDevice) -> None:
    buffers: tuple[BytesLike, ...] = (
        bytearray(_pattern(101, 2)),
        memoryview(_pattern(102, 2)),
        _pattern(103, 2),
    )
    for tag, buf in enumerate(buffers):
        device.write(100 + tag * 2, buf)
        _expect_read(device, 100 + tag * 2, bytes(buf), f"write from {type(buf).__name__}")
    # A slice of a larger buffer, as the SCSI layer passes from a receive buffer.
    big = memoryview(_pattern(104, 8))
    device.write(200, big[LOGICAL_BLOCK_SIZE : 3 * LOGICAL_BLOCK_SIZE])
    _expect_read(device, 200, bytes(big[LOGICAL_BLOCK_SIZE : 3 * LOGICAL_BLOCK_SIZE]), "slice")


def check_readinto_matches_read(device: BlockDevice) -> None:
    per = _per_physical(device)
    _write(device, 0, _pattern(7, 4 * per))
    device.write(10 * per + 3, _pattern(8, 2))
    cases = ((0, 4 * per), (1, 3), (10 * per, per), (10 * per + 2, 5), (50 * per, 2))
    for lba, count in cases:
        count = min(count, device.max_transfer_blocks)
        buf = bytearray(b"\xee" * (count * LOGICAL_BLOCK_SIZE))
        device.readinto(lba, memoryview(buf))
        assert bytes(buf) == device.read(lba, count), (
            f"readinto({lba}, {count} blocks) differs from read: "
            f"{_describe(bytes(buf), device.read(lba, count))}"
        )
    # Reading into a slice must leave the rest of the caller's buffer alone.
    buf = bytearray(b"\xee" * (4 * LOGICAL_BLOCK_SIZE))
    device.readinto(0, memoryview(buf)[LOGICAL_BLOCK_SIZE : 2 * LOGICAL_BLOCK_SIZE])
    assert buf[:LOGICAL_BLOCK_SIZE] == b"\xee" * LOGICAL_BLOCK_SIZE, "readinto wrote before"
    assert buf[2 * LOGICAL_BLOCK_SIZE :] == b"\xee" * (2 * LOGICAL_BLOCK_SIZE), "readinto overran"
    assert bytes(buf[LOGICAL_BLOCK_SIZE : 2 * LOGICAL_BLOCK_SIZE]) == device.read(0, 1), (
        "readinto into a slice of a larger buffer returned the wrong data"
    )


def check_bounds(device: BlockDevice) -> None:
    n = device.block_count
    cap = device.max_transfer_blocks
    one = bytes(LOGICAL_BLOCK_SIZE)
    buf = memoryview(bytearray(LOGICAL_BLOCK_SIZE))
    out = OutOfRangeError
    _expect_error(out, "read at lba -1", lambda: device.read(-1, 1))
    _expect_error(out, "read with a negative count", lambda: device.read(0, -1))
    _expect_error(out, "read past the end", lambda: device.read(n - 1, 2))
    _expect_error(out, "read starting at block_count", lambda: device.read(n, 1))
    _expect_error(out, "readinto past the end", lambda: device.readinto(n, buf))
    _expect_error(out, "readinto at lba -1", lambda: device.readinto(-1, buf))
    _expect_error(out, "write at lba -1", lambda: device.write(-1, one))
    _expect_error(out, "write starting at block_count", lambda: device.write(n, one))
    _expect_error(out, "unmap at lba -1", lambda: device.unmap(-1, 1))
    _expect_error(out, "unmap past the end", lambda: device.unmap(n - 1, 2))
    _expect_error(out, "write_zeroes past the end", lambda: device.write_zeroes(n - 1, 2))
    _expect_error(out, "write_zeroes at lba -1", lambda: device.write_zeroes(-1, 1))
    _expect_error(out, "lba_status at lba -1", lambda: device.lba_status(-1))
    _expect_error(out, "lba_status at block_count", lambda: device.lba_status(n))

    # When a request is both too long and past the end, either answer is correct.
    too_large: type[Exception] | tuple[type[Exception], ...] = (
        TransferTooLargeError if cap + 1 <= n else (TransferTooLargeError, OutOfRangeError)
    )
    _expect_error(too_large, "read above max_transfer_blocks", lambda: device.read(0, cap + 1))
    big = bytes((cap + 1) * LOGICAL_BLOCK_SIZE)
    _expect_error(too_large, "write above max_transfer_blocks", lambda: device.write(0, big))
    big_buf = memoryview(bytearray(big))
    _expect_error(too_large, "readinto above max_transfer", lambda: device.readinto(0, big_buf))

    mis = MisalignedError
    _expect_error(mis, "write of 100 bytes", lambda: device.write(0, bytes(100)))
    _expect_error(mis, "write of 513 bytes", lambda: device.write(0, bytes(513)))
    _expect_error(mis, "write of 4095 bytes", lambda: device.write(8, bytes(4095)))
    _expect_error(mis, "readinto a 100-byte buffer", lambda: device.readinto(0, buf[:100]))

    # A refused request must not have changed anything.
    _expect_read(device, n - 1, one, "last LBA after refused writes past the end")
    _expect_read(device, 0, bytes(16 * LOGICAL_BLOCK_SIZE), "first blocks after refused writes")
    # The maximum transfer itself is allowed.
    if cap <= n:
        data = device.read(0, cap)
        assert len(data) == cap * LOGICAL_BLOCK_SIZE, "a read of max_transfer_blocks failed"


def check_unmap_and_write_zeroes(device: BlockDevice) -> None:
    per = _per_physical(device)
    large = LARGE_RANGE_BYTES // LOGICAL_BLOCK_SIZE
    for name in ("unmap", "write_zeroes"):
        op = device.unmap if name == "unmap" else device.write_zeroes
        # Both operations use the same area: a 4 MiB device has room for it only once.
        base = 0
        # Each case: (what, range start, range length), relative to a fully written area.
        cases = [
            ("one aligned physical block", 8 * per, per),
            ("several aligned blocks", 16 * per, 4 * per),
            ("one sector", 32 * per + 5, 1),
            ("unaligned both ends", 40 * per + 3, 2 * per + 2),
            ("inside one physical block", 48 * per + 1, per - 2 if per > 2 else 1),
        ]
        area = 64 * per
        written = _pattern(20, area)
        _write(device, base, written)
        model = bytearray(written)
        for what, lba, count in cases:
            op(base + lba, count)
            model[lba * LOGICAL_BLOCK_SIZE : (lba + count) * LOGICAL_BLOCK_SIZE] = bytes(
                count * LOGICAL_BLOCK_SIZE
            )
            _expect_read(device, base, bytes(model), f"{name} of {what}")
        # A range larger than the engine logs in its WAL, with ragged ends.
        big_base = base + area
        big_count = large + per + 2
        big_model = bytearray(_pattern(21, big_count + per + 1))
        _write(device, big_base, big_model)
        _in_chunks(device, op, big_base + 1, big_count)
        big_model[LOGICAL_BLOCK_SIZE : (1 + big_count) * LOGICAL_BLOCK_SIZE] = bytes(
            big_count * LOGICAL_BLOCK_SIZE
        )
        _expect_read(device, big_base, bytes(big_model), f"{name} of a large unaligned range")
        # Zero-length requests are no-ops.
        op(base, 0)
        _expect_read(device, base, bytes(model), f"{name} of zero blocks changed data")
        # Unmapping never-written blocks is fine and they stay zero.
        op(device.block_count - per, per)
        _expect_read(device, device.block_count - per, bytes(per * 512), f"{name} at the end")


def check_lba_status(device: BlockDevice) -> None:
    per = _per_physical(device)
    last = device.block_count - 1
    for lba in (0, per, device.block_count // 2, last):
        _expect_status(device, lba, mapped=False, what="never-written block")
    _write(device, 8 * per, _pattern(30, per))
    _expect_status(device, 8 * per, mapped=True, what="after an aligned write")
    _expect_status(device, 8 * per + per - 1, mapped=True, what="last sector of a written block")
    device.write(12 * per + 2, _pattern(31, 1))
    _expect_status(device, 12 * per + 2, mapped=True, what="after a 1-sector write")
    device.write(last, _pattern(32, 1))
    _expect_status(device, last, mapped=True, what="after writing the last LBA")
    _write(device, 16 * per, _pattern(33, 4 * per))
    _in_chunks(device, device.unmap, 16 * per, 4 * per)
    for lba in (16 * per, 17 * per + 1, 20 * per - 1):
        _expect_status(device, lba, mapped=False, what="after an aligned unmap")
    _write(device, 24 * per, _pattern(34, 4 * per))
    _in_chunks(device, device.write_zeroes, 24 * per, 4 * per)
    _expect_status(device, 24 * per, mapped=False, what="after an aligned write_zeroes")
    large = LARGE_RANGE_BYTES // LOGICAL_BLOCK_SIZE
    base = device.block_count // 2 // per * per
    _write(device, base, _pattern(35, per))
    _write(device, base + large - per, _pattern(36, per))
    _in_chunks(device, device.unmap, base, large)
    _expect_status(device, base, mapped=False, what="start of a large unmap")
    _expect_status(device, base + large - 1, mapped=False, what="end of a large unmap")
    _expect_status(device, 8 * per, mapped=True, what="a written block after other unmaps")
    device.flush()
    _expect_status(device, 8 * per, mapped=True, what="a written block after flush")
    _expect_status(device, 16 * per, mapped=False, what="an unmapped block after flush")


def check_flush_and_fua(device: BlockDevice) -> None:
    per = _per_physical(device)
    device.flush()
    a = _pattern(40, per)
    _write(device, 0, a)
    device.flush()
    _expect_read(device, 0, a, "data after flush")
    b = _pattern(41, 2 * per)
    _write(device, per, b, fua=True)
    _expect_read(device, per, b, "after a FUA write")
    c = _pattern(42, 1)
    device.write(10 * per + 1, c, fua=True)
    _expect_read(device, 10 * per + 1, c, "after an unaligned FUA write")
    device.unmap(0, per)
    device.flush()
    device.flush()
    _expect_read(device, 0, bytes(per * LOGICAL_BLOCK_SIZE) + b, "after unmap and two flushes")


def check_overlapping_writes(device: BlockDevice) -> None:
    per = _per_physical(device)
    model = bytearray(8 * per * LOGICAL_BLOCK_SIZE)
    writes = [
        (0, 8 * per),
        (per, 2 * per),
        (per + 3, 1),
        (2 * per - 1, 4),
        (0, 1),
        (5, 8 * per - 5),
    ]
    for tag, (lba, count) in enumerate(writes, start=50):
        data = _pattern(tag, count)
        _write(device, lba, data)
        model[lba * LOGICAL_BLOCK_SIZE : (lba + count) * LOGICAL_BLOCK_SIZE] = data
        _expect_read(device, 0, bytes(model), f"overlapping write #{tag - 49} (newest wins)")


def check_random_against_model(device: BlockDevice) -> None:
    rng = random.Random(RANDOM_SEED)
    per = _per_physical(device)
    # Confine to a window so the model stays small but includes the device's last blocks.
    window = min(device.block_count, 2048)
    base = device.block_count - window
    model = bytearray(window * LOGICAL_BLOCK_SIZE)
    for i in range(RANDOM_OPS_COUNT):
        op = rng.random()
        lba = rng.randrange(window)
        count = rng.randint(1, min(4 * per, window - lba, device.max_transfer_blocks))
        span = slice(lba * LOGICAL_BLOCK_SIZE, (lba + count) * LOGICAL_BLOCK_SIZE)
        if op < 0.6:
            data = rng.randbytes(count * LOGICAL_BLOCK_SIZE)
            device.write(base + lba, data, fua=rng.random() < 0.05)
            model[span] = data
        elif op < 0.7:
            device.unmap(base + lba, count)
            model[span] = bytes(count * LOGICAL_BLOCK_SIZE)
        elif op < 0.75:
            device.write_zeroes(base + lba, count)
            model[span] = bytes(count * LOGICAL_BLOCK_SIZE)
        elif op < 0.78:
            device.flush()
        else:
            _expect_read(device, base + lba, bytes(model[span]), f"random op #{i}: read")
    for lba in range(0, window, 512):
        count = min(512, window - lba)
        expected = bytes(model[lba * LOGICAL_BLOCK_SIZE : (lba + count) * LOGICAL_BLOCK_SIZE])
        _expect_read(device, base + lba, expected, "final state after random operations")


#: Every check, in the order they run. Each gets a fresh device.
CHECKS: tuple[_Check, ...] = (
    check_geometry,
    check_never_written_reads_zeros,
    check_read_after_write,
    check_sub_block_writes_keep_neighbours,
    check_write_accepts_buffer_types,
    check_readinto_matches_read,
    check_bounds,
    check_unmap_and_write_zeroes,
    check_lba_status,
    check_flush_and_fua,
    check_overlapping_writes,
    check_random_against_model,
)


def check_block_device(factory: DeviceFactory) -> None:
    """Run every conformance check on a fresh device from ``factory``.

    Raises ``AssertionError`` whose message starts with the failed check's name. Any other
    exception the device raises propagates unchanged, annotated with the check's name.
    """
    for check in CHECKS:
        name = check.__name__
        with _fresh(factory) as device:
            try:
                check(device)
            except AssertionError as exc:
                raise AssertionError(f"block device conformance: {name}: {exc}") from exc
            except Exception as exc:
                exc.add_note(f"raised during block device conformance check {name}")
                raise
