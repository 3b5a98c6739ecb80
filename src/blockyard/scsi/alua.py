"""Asymmetric logical unit access (SPC-4 §5.15): port group states and REPORT TARGET PORT GROUPS.

The server decides states (primary = active/optimized, replica = standby); this module only
reports them and says which commands a state admits.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Protocol


class AccessState(IntEnum):
    """SPC-4 §6.37 Table 228 ASYMMETRIC ACCESS STATE values."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    TRANSITIONING = 0xF


# SPC-4 §6.37: supported-state bits of byte 1 of a target port group descriptor.
_T_SUP: Final = 0x80
_U_SUP: Final = 0x08
_S_SUP: Final = 0x04
_AN_SUP: Final = 0x02
_AO_SUP: Final = 0x01
SUPPORTED_STATES: Final = _T_SUP | _U_SUP | _S_SUP | _AN_SUP | _AO_SUP

#: SPC-4 §6.37: seconds an initiator should wait for an implicit transition (extended header).
IMPLICIT_TRANSITION_TIME_S: Final = 10
#: Bound on groups and ports reported, so RTPG data has a fixed worst-case size.
PORT_GROUPS_MAX: Final = 64
PORTS_PER_GROUP_MAX: Final = 64


@dataclass(frozen=True, slots=True)
class TargetPortGroup:
    """A target port group: its id, state and the relative target port ids in it."""

    group_id: int
    state: AccessState
    relative_port_ids: tuple[int, ...]
    preferred: bool = False


class AluaProvider(Protocol):
    """Where the logical unit reads ALUA states. Implementations must be thread-safe."""

    def access_state(self, group_id: int) -> AccessState:
        """State of ``group_id``; unknown groups should answer UNAVAILABLE."""
        ...

    def port_groups(self) -> Sequence[TargetPortGroup]: ...


class StaticAlua:
    """An :class:`AluaProvider` held in memory and changed by the server.

    Changing a state does not raise the unit attention itself: the server calls
    :meth:`LogicalUnit.notify_alua_changed` after :meth:`set_state`, so one place owns UAs.

    ``serving``, when given, is asked on every query: while it answers False an active group
    reports TRANSITIONING (SPC-4 §5.15.2.6) instead. The server passes a primary's lease
    (:meth:`~blockyard.replication.lease.PrimaryLease.allows`), so a primary that may have been
    deposed (its lease ran out: paused, cut off) steers multipath initiators to the other
    paths by itself, without waiting for the master to reach it. It must be thread-safe and
    cheap (it is called per command).
    """

    def __init__(
        self,
        groups: Sequence[TargetPortGroup],
        *,
        serving: Callable[[], bool] | None = None,
    ) -> None:
        if not groups or len(groups) > PORT_GROUPS_MAX:
            raise ValueError(f"need 1..{PORT_GROUPS_MAX} target port groups, got {len(groups)}")
        self._lock = threading.Lock()
        self._groups = {g.group_id: g for g in groups}
        self._serving = serving

    @classmethod
    def single(
        cls,
        state: AccessState = AccessState.ACTIVE_OPTIMIZED,
        *,
        group_id: int = 1,
        port_id: int = 1,
    ) -> StaticAlua:
        return cls([TargetPortGroup(group_id, state, (port_id,), preferred=True)])

    def access_state(self, group_id: int) -> AccessState:
        group = self._groups.get(group_id)
        if group is None:
            return AccessState.UNAVAILABLE
        return self._gated(group.state)

    def port_groups(self) -> Sequence[TargetPortGroup]:
        with self._lock:
            groups = tuple(self._groups.values())
        return tuple(
            g
            if (state := self._gated(g.state)) is g.state
            else TargetPortGroup(g.group_id, state, g.relative_port_ids, g.preferred)
            for g in groups
        )

    def _gated(self, state: AccessState) -> AccessState:
        serving = self._serving
        if state <= AccessState.ACTIVE_NON_OPTIMIZED and serving is not None and not serving():
            return AccessState.TRANSITIONING
        return state

    def set_state(self, group_id: int, state: AccessState) -> None:
        with self._lock:
            group = self._groups[group_id]
            self._groups[group_id] = TargetPortGroup(
                group.group_id, state, group.relative_port_ids, group.preferred
            )


_HDR_EXT = struct.Struct(">IBB2x")
_DESC = struct.Struct(">BBHxBxB")
_PORT = struct.Struct(">2xH")


def encode_rtpg(groups: Sequence[TargetPortGroup], *, extended: bool) -> bytes:
    """REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.37), length or extended header."""
    body = bytearray()
    for group in groups[:PORT_GROUPS_MAX]:
        ports = group.relative_port_ids[:PORTS_PER_GROUP_MAX]
        first = (0x80 if group.preferred else 0) | int(group.state)
        # STATUS CODE 02h: state altered by implicit asymmetric access behaviour.
        body += _DESC.pack(first, SUPPORTED_STATES, group.group_id & 0xFFFF, 0x02, len(ports))
        for port in ports:
            body += _PORT.pack(port & 0xFFFF)
    if extended:
        # FORMAT TYPE 001b: RETURN DATA LENGTH counts bytes after the 8-byte header too.
        return _HDR_EXT.pack(len(body) + 4, 0x10, IMPLICIT_TRANSITION_TIME_S) + bytes(body)
    return struct.pack(">I", len(body)) + bytes(body)
