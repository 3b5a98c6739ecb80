"""Network namespaces joined to the host by veth pairs, for partition tests (root only).

A partition is a link taken down: the kernel drops the packets, TCP retransmits, and neither
side gets a RST or a FIN, as on a real network that fails. Tests that need one make a
namespace with :func:`namespace`, add veth pairs with :func:`add_veth`, run processes in it
with ``ip netns exec NAME ...`` and take a pair's inner end down and up."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import Final

#: Every ``ip`` call returns well within this (it only talks to the kernel).
IP_TIMEOUT_S: Final = 10.0


class NetnsUnavailableError(RuntimeError):
    """Namespaces cannot be made here (no root, no ``ip``, or the kernel refuses)."""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=IP_TIMEOUT_S, capture_output=True)


@contextlib.contextmanager
def namespace(name: str, host_links: list[str]) -> Iterator[str]:
    """A new namespace ``name`` with its loopback up; deleted on exit with its veth ends (and
    so the pairs), and the host ends named in ``host_links`` (filled by :func:`add_veth`)
    removed in case the namespace went first. Raises :class:`NetnsUnavailableError` when it
    cannot be made."""
    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        raise NetnsUnavailableError(f"cannot make a network namespace here: {exc}") from exc
    try:
        ip("-n", name, "link", "set", "dev", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=IP_TIMEOUT_S, check=False)
        for host in host_links:
            subprocess.run(
                ["ip", "link", "del", host], timeout=IP_TIMEOUT_S, check=False, capture_output=True
            )


def add_veth(
    ns: str, host: str, inner: str, host_addr: str, inner_addr: str, prefix: int = 30
) -> None:
    """A veth pair: ``host`` stays in this namespace with ``host_addr``, ``inner`` moves into
    ``ns`` with ``inner_addr``; both ends up."""
    ip("link", "add", host, "type", "veth", "peer", "name", inner)
    ip("link", "set", "dev", inner, "netns", ns)
    ip("addr", "add", f"{host_addr}/{prefix}", "dev", host)
    ip("-n", ns, "addr", "add", f"{inner_addr}/{prefix}", "dev", inner)
    ip("link", "set", "dev", host, "up")
    ip("-n", ns, "link", "set", "dev", inner, "up")


def set_link(ns: str, inner: str, *, up: bool) -> None:
    """Take the namespace's end of a pair down (a partition) or up (healed)."""
    ip("-n", ns, "link", "set", "dev", inner, "up" if up else "down")
