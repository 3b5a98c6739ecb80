"""An etcd store whose cluster cannot be reached fails open() within its operation timeout with
StoreUnavailableError (or StoreTimeoutError, a subclass) naming the endpoints and what to check,
holds nothing afterwards, and refuses writes as not open."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from blockyard.errors import StoreClosedError, StoreUnavailableError
from blockyard.master.store_etcd import EtcdStore


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket closes


def test_open_fails_within_the_timeout_naming_the_endpoints() -> None:
    endpoint = f"127.0.0.1:{_closed_port()}"

    async def main() -> float:
        store = EtcdStore([endpoint], op_timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            await store.open()
        took = time.monotonic() - started
        assert endpoint in str(info.value)
        assert "check that etcd runs" in str(info.value)
        with pytest.raises(StoreClosedError):
            await store.put("volumes", "v", b"x", expect_version=0)
        await store.close()  # nothing to release
        return took

    took = asyncio.run(main())
    assert took < 10.0  # bounded by op_timeout_s (1 s), with room for a loaded machine
