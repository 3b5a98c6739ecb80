"""free_port: distinct, bindable ports from below the ephemeral range.

The cluster harness picks every server's three ports before starting any of them;
CI once saw two of those picks come back equal ("address already in use").
"""

from __future__ import annotations

import socket

import pytest

from blockyard import netports
from blockyard.netports import free_port


def test_never_hands_the_same_port_out_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    low = netports._ephemeral_low()
    for _ in range(20):
        port = free_port()
        assert netports._LOWEST <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


class _Draws:
    """A stand-in for the random source: returns the given ports in order."""

    def __init__(self, *ports: int) -> None:
        self._ports = list(ports)

    def randrange(self, start: int, stop: int) -> int:
        return self._ports.pop(0)


def test_a_port_in_use_or_already_handed_out_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held, socket.socket() as probe:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        taken = held.getsockname()[1]
        probe.bind(("127.0.0.1", 0))
        given = probe.getsockname()[1]
        probe.close()
        spare = free_port()
        monkeypatch.setattr(netports, "_rng", _Draws(taken, spare, given))
        assert free_port() == given  # in use, then already handed out, then free
