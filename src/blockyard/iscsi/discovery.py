"""iSCSI names and SendTargets discovery answers.

Names (RFC 7143 §4.2.7): ``iqn.`` (date + reversed domain + optional ``:`` suffix), ``eui.``
(16 hex digits) or ``naa.`` (16 or 32 hex digits), at most 223 bytes, in the RFC 3722
stringprep profile (so lower case). :func:`iqn_for_volume` builds one IQN per volume that never
collides with another volume's.

SendTargets (RFC 7143 Appendix C): for each target, ``TargetName=<name>`` followed by one
``TargetAddress=<host>:<port>,<tpgt>`` per portal.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from blockyard.errors import InvalidNameError
from blockyard.iscsi.text import TextPairs

MAX_NAME_LENGTH = 223  # RFC 7143 §4.2.7.1: "iSCSI names ... up to 223 bytes"
DEFAULT_PORT = 3260  # RFC 7143 §13.8: the well-known iSCSI port
SEND_TARGETS_ALL = "All"  # RFC 7143 Appendix C

#: Characters an IQN keeps unchanged: RFC 3722 §6 leaves ASCII lower-case letters, digits,
#: '-', '.' and ':'; everything else is mapped or prohibited, so we replace it.
_IQN_DISALLOWED_RE = re.compile(r"[^a-z0-9.:\-]")
#: RFC 7143 §4.2.7.2: iqn.yyyy-mm.reversed.domain[:anything]
_IQN_RE = re.compile(
    r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?"
    r"(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*(:[a-z0-9.:\-]*)?"
)
_EUI_RE = re.compile(r"eui\.[0-9A-F]{16}")  # RFC 7143 §4.2.7.3 (upper-case hex)
_NAA_RE = re.compile(r"naa\.([0-9A-F]{16}|[0-9A-F]{32})")  # RFC 7143 §4.2.7.4
_HASH_HEX_DIGITS = 16  # 64 bits of SHA-256: a collision needs ~2**32 volumes under one prefix
_HASH_SUFFIX_RE = re.compile(rf"-h[0-9a-f]{{{_HASH_HEX_DIGITS}}}$")


def is_valid_iscsi_name(name: str) -> bool:
    """Whether ``name`` is a well-formed iqn./eui./naa. name of at most 223 bytes.

    Only the ASCII subset of the RFC 3722 profile is accepted for IQN suffixes.
    """
    if len(name.encode("utf-8")) > MAX_NAME_LENGTH:
        return False
    return bool(_IQN_RE.fullmatch(name) or _EUI_RE.fullmatch(name) or _NAA_RE.fullmatch(name))


def iqn_for_volume(prefix: str, name: str) -> str:
    """``<prefix>:<name>`` made into a valid IQN, distinct for distinct ``name``.

    The name is lower-cased and every character outside ``a-z 0-9 - . :`` becomes ``-``; the
    result is truncated to fit 223 bytes. Whenever that changed anything, or the name already
    ends like a hash suffix, ``-h`` plus 16 hex digits of SHA-256(name) is appended. So
    unchanged names map to themselves, changed names carry a hash of the original, and the two
    sets cannot meet. Deterministic across processes.
    """
    if not _IQN_RE.fullmatch(prefix) or ":" in prefix:
        raise InvalidNameError(
            f"IQN prefix {prefix!r} must look like iqn.2024-01.org.example (RFC 7143 §4.2.7.2), "
            "without a ':' part"
        )
    if not name:
        raise InvalidNameError("volume name is empty; an IQN needs a non-empty suffix")
    head = prefix + ":"
    sanitized = _IQN_DISALLOWED_RE.sub("-", name.lower())
    if (
        sanitized == name
        and len(head) + len(sanitized) <= MAX_NAME_LENGTH
        and not _HASH_SUFFIX_RE.search(sanitized)
    ):
        return head + sanitized
    suffix = "-h" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:_HASH_HEX_DIGITS]
    room = MAX_NAME_LENGTH - len(head) - len(suffix)
    if room < 1:
        raise InvalidNameError(
            f"IQN prefix {prefix!r} is too long to leave room for a volume name within "
            f"{MAX_NAME_LENGTH} bytes; use a shorter prefix"
        )
    return head + sanitized[:room] + suffix


@dataclass(frozen=True, slots=True)
class Portal:
    """One network portal of a target portal group (RFC 7143 §13.8 TargetAddress)."""

    host: str
    port: int = DEFAULT_PORT
    portal_group_tag: int = 1

    def address(self) -> str:
        # RFC 7143 §13.8: IPv6 literals are bracketed; DNS names and IPv4 go as they are.
        host = f"[{self.host}]" if _is_ipv6(self.host) else self.host
        return f"{host}:{self.port},{self.portal_group_tag}"


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class DiscoveryTarget:
    """A target as discovery reports it."""

    name: str
    portals: tuple[Portal, ...]


def send_targets_pairs(
    value: str,
    targets: Iterable[DiscoveryTarget],
    *,
    session_target: str | None = None,
) -> TextPairs:
    """Answer ``SendTargets=<value>`` (RFC 7143 Appendix C).

    ``targets`` are the targets this initiator may see (the caller applies the ACL).
    ``All`` lists them all (Discovery sessions only: pass ``session_target=None``); a target
    name lists that one; an empty value in a Normal session lists the session's own target.
    Unknown names yield no pairs, which is the spec's "nothing to report".
    """
    if value == SEND_TARGETS_ALL:
        if session_target is not None:
            return []  # RFC 7143 Appendix C: "All" is for Discovery sessions only
        wanted = None
    elif value == "":
        if session_target is None:
            return []
        wanted = session_target
    else:
        wanted = value
    pairs: TextPairs = []
    for target in targets:
        if wanted is not None and target.name != wanted:
            continue
        pairs.append(("TargetName", target.name))
        pairs.extend(("TargetAddress", portal.address()) for portal in target.portals)
    return pairs
