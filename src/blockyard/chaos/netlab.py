"""A network for partitions: each volume server in its own network namespace, joined to the
host by a veth pair; the master on the host, listening on every address, each server dialing
it at the host end of its own link; the host routes between the namespaces
(``net.ipv4.ip_forward``, restored on close). The harness itself (the initiator) stays on the
host. Taking a server's inner link down isolates it from everyone — the master, the other
servers and the initiator — and the kernel drops the packets: no RST, no FIN, as on a real
network that fails. Root only; :class:`~blockyard.testing.netns.NetnsUnavailableError` where
namespaces cannot be made.

A master group (several masters) is reached at one more host address, :attr:`NetLab.master_addr`
(a /32 on the host's loopback, routed to from every namespace by its default route), which the
masters also advertise: a follower's redirect to the leader then names an address the servers
dial the same way. :meth:`NetLab.cut_from_master` puts a blackhole route to it in one server's
namespace: that server's established connections to the masters go silent (no RST, no FIN) and
new ones fail at once, while its links to its peers and the initiator stay up."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from blockyard.testing import netns

_FORWARD: Final = Path("/proc/sys/net/ipv4/ip_forward")
#: The lab's addresses are 10.X.i.0/30 with X in this range, one not on any interface yet (so
#: a lab left behind by a killed run, or another run, does not shadow this one).
_SECOND_OCTETS: Final = range(200, 250)


def _free_second_octet(tag: int) -> int:
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                          timeout=netns.IP_TIMEOUT_S, check=False).stdout  # fmt: skip
    taken = {int(m) for m in re.findall(r"inet 10\.(\d+)\.", used)}
    n = len(_SECOND_OCTETS)
    for i in range(n):
        octet = _SECOND_OCTETS[(tag + i) % n]
        if octet not in taken:
            return octet
    raise netns.NetnsUnavailableError(f"every 10.X network with X in {_SECOND_OCTETS} is in use")


@dataclass(frozen=True)
class ServerNet:
    """One server's namespace and link."""

    ns: str
    host_if: str
    inner_if: str
    host_addr: str
    inner_addr: str

    @property
    def wrapper(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns)


class NetLab:
    """``count`` server namespaces and the master's host address. Use as a context manager."""

    def __init__(self, count: int, tag: int | None = None) -> None:
        tag = os.getpid() % 10000 if tag is None else tag
        base = f"10.{_free_second_octet(tag)}"
        #: Where the servers reach a master group (see the module docstring).
        self.master_addr = f"{base}.254.1"
        self._master_addr_added = False
        self.servers = [
            ServerNet(f"bych{tag}s{i}", f"bych{tag}h{i}", f"bych{tag}n{i}",
                      f"{base}.{i}.1", f"{base}.{i}.2")
            for i in range(count)
        ]  # fmt: skip
        self._stack = contextlib.ExitStack()
        self._forward_was: str | None = None

    def __enter__(self) -> NetLab:
        try:
            for s in self.servers:
                self._stack.enter_context(netns.namespace(s.ns, [s.host_if]))
                netns.add_veth(s.ns, s.host_if, s.inner_if, s.host_addr, s.inner_addr)
                netns.ip("-n", s.ns, "route", "add", "default", "via", s.host_addr)
            netns.ip("addr", "add", f"{self.master_addr}/32", "dev", "lo")
            self._master_addr_added = True
            self._forward_was = _FORWARD.read_text().strip()
            _FORWARD.write_text("1\n")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._forward_was is not None:
            _FORWARD.write_text(self._forward_was + "\n")
            self._forward_was = None
        if self._master_addr_added:
            subprocess.run(
                ["ip", "addr", "del", f"{self.master_addr}/32", "dev", "lo"],
                timeout=netns.IP_TIMEOUT_S, check=False, capture_output=True,
            )  # fmt: skip
            self._master_addr_added = False
        self._stack.close()

    def partition(self, index: int) -> None:
        s = self.servers[index]
        netns.set_link(s.ns, s.inner_if, up=False)

    def heal(self, index: int) -> None:
        s = self.servers[index]
        netns.set_link(s.ns, s.inner_if, up=True)
        # Taking a link down drops its routes; the default route must come back with it.
        netns.ip("-n", s.ns, "route", "replace", "default", "via", s.host_addr)

    def cut_from_master(self, index: int) -> None:
        """Server ``index`` no longer reaches :attr:`master_addr` (a blackhole route)."""
        s = self.servers[index]
        netns.ip("-n", s.ns, "route", "replace", "blackhole", f"{self.master_addr}/32")

    def reconnect_to_master(self, index: int) -> None:
        s = self.servers[index]
        netns.ip("-n", s.ns, "route", "del", "blackhole", f"{self.master_addr}/32")
