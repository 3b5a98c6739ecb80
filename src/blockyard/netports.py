"""Pick TCP ports for listeners that are started later (test clusters, ``blockyard up``).

Binding to port 0 and releasing the socket hands out a port from the kernel's
ephemeral range, and two things go wrong with that when the port is bound only
later, by another process:

* the kernel may hand the same port out again to the next caller (two listeners
  of one cluster then collide: "address already in use");
* every outgoing connection in the meantime also draws its local port from that
  range, so a client socket can sit on the port before the listener binds it.

So the ports come from below the ephemeral range (which outgoing connections
never use), are probed by binding, and are never handed out twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

# Linux's default net.ipv4.ip_local_port_range is 32768-60999; ports below it
# are not used for outgoing connections.
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL_LOW = 32768
# Below this lie the registered ports of well-known services; stay clear of them.
_LOWEST = 20000
_ATTEMPTS = 200

_lock = threading.Lock()
_handed_out: set[int] = set()
_rng = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_LOW


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, outside the ephemeral range when it can be, never repeated.

    Raises OSError when no port could be found (every candidate in use).
    """
    low = _ephemeral_low()
    with _lock:
        if low - _LOWEST >= 1000:
            for _ in range(_ATTEMPTS):
                port = _rng.randrange(_LOWEST, low)
                if port not in _handed_out and _bindable(host, port):
                    _handed_out.add(port)
                    return port
        # The ephemeral range starts too low to stay out of it: let the kernel pick,
        # still never handing the same port out twice.
        for _ in range(_ATTEMPTS):
            port = _kernel_port(host)
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise OSError(f"no free TCP port on {host} after {_ATTEMPTS} attempts")
