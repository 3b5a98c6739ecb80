"""Pure helpers that name an initiator's I_T nexus: a random ISID per path, the 8-byte LUN
field, and a SendTargets ``TargetAddress`` parsed into a portal."""

from __future__ import annotations

import os

from blockyard.iscsi.discovery import DEFAULT_PORT, Portal

#: RFC 7143 §11.12.5: ISID type 10b ("random") in the top two bits of the 6-byte ISID.
_ISID_TYPE_RANDOM = 0b10 << 46


def random_isid() -> int:
    """A random-type ISID (RFC 7143 §11.12.5): each path gets its own I_T nexus."""
    return _ISID_TYPE_RANDOM | int.from_bytes(os.urandom(6), "big") & ((1 << 46) - 1)


def encode_lun(lun: int) -> int:
    """The 8-byte LUN field for ``lun``: peripheral addressing below 256, flat space up to
    16383 (SAM-5 §4.7.7)."""
    if not 0 <= lun <= 0x3FFF:
        raise ValueError(f"LUN {lun} is outside 0..16383")
    if lun < 256:
        return lun << 48
    return (0x4000 | lun) << 48


def parse_target_address(text: str) -> Portal:
    """``host[:port][,tpgt]`` with IPv6 literals bracketed (RFC 7143 §13.8)."""
    address, _, tag = text.partition(",")
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = address.rpartition(":") if ":" in address else (address, "", "")
    port = int(port_text) if port_text.isdigit() else DEFAULT_PORT
    tpgt = int(tag) if tag.isdigit() else 1
    return Portal(host, port, tpgt)


__all__ = ["encode_lun", "parse_target_address", "random_isid"]
