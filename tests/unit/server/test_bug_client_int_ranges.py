"""Regression: the management API client handed integers to protobuf unchecked, so a size past
2**64 - 1 (or a negative one) escaped as ``ValueError: Value out of range`` from the encoder
instead of a blockyard error the CLI prints in one line. Every integer field of a request is
now range-checked first; no server is needed because nothing is sent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from blockyard.engine.epoch import Role
from blockyard.errors import InvalidArgumentError, InvalidSizeError
from blockyard.scsi.alua import AccessState
from blockyard.server.client import VolumeServerClient

#: Nothing listens here, and nothing is dialed: every call below fails its check first.
NOWHERE = "127.0.0.1:1"


def refused(call: Callable[[VolumeServerClient], Awaitable[object]]) -> BaseException:
    async def main() -> BaseException:
        async with VolumeServerClient(NOWHERE, timeout_s=5) as client:
            with pytest.raises(InvalidArgumentError) as info:
                await call(client)
            return info.value

    return asyncio.run(main())


@pytest.mark.parametrize("size", [1 << 64, 1 << 70, -1])
def test_sizes_outside_uint64(size: int) -> None:
    for call in (
        lambda c: c.create_volume("v", size),
        lambda c: c.expand_volume("v", size),
    ):
        error = refused(call)
        assert isinstance(error, InvalidSizeError)
        assert f"size_bytes {size}" in str(error)


def test_other_integer_fields() -> None:
    error = refused(lambda c: c.set_volume_role("v", Role.PRIMARY, 1 << 64))
    assert "epoch" in str(error)
    error = refused(lambda c: c.set_port_state("v", 1 << 32, AccessState.STANDBY))
    assert "portal_group_tag" in str(error)
    error = refused(lambda c: c.list_volumes(page_size=1 << 31))
    assert "page_size" in str(error)
