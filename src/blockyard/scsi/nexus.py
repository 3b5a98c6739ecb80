"""I_T nexus identity and the per-nexus unit attention queue (SAM-5 §5.14, SPC-4 §5.14)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from blockyard.scsi.constants import AscPair

#: Unit attentions kept per I_T nexus. SAM-5 §5.14 lets a logical unit drop conditions it cannot
#: queue; sixteen covers every distinct condition this target raises, so only repeats are lost.
UA_QUEUE_DEPTH_MAX: Final = 16


@dataclass(frozen=True, slots=True)
class Nexus:
    """One I_T nexus as the transport sees it.

    ``initiator_port_name`` is the iSCSI initiator name + ``",i,0x"`` + ISID (RFC 7143 §4.2.7),
    ``target_port_name`` the target name + ``",t,0x"`` + TPGT. ``relative_target_port_id`` and
    ``target_port_group_id`` are the SPC-4 §7.8.6 identifiers the transport assigned to the port.
    """

    initiator_port_name: str
    target_port_name: str
    relative_target_port_id: int
    target_port_group_id: int

    @property
    def initiator_name(self) -> str:
        """The iSCSI name without the ISID suffix."""
        return self.initiator_port_name.split(",i,", 1)[0]


class UnitAttentionQueue:
    """Pending unit attentions for one I_T nexus, oldest first. Not thread-safe (the LU locks).

    Reset conditions (ASC 29h) supersede everything queued before them: after a reset the
    initiator rediscovers all state, so the older conditions carry no extra information.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[AscPair] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, asc: AscPair) -> None:
        if asc[0] == 0x29:
            self._items.clear()
        elif asc in self._items:
            return
        if len(self._items) >= UA_QUEUE_DEPTH_MAX:
            self._items.popleft()
        self._items.append(asc)

    def pop(self) -> AscPair | None:
        return self._items.popleft() if self._items else None

    def peek(self) -> AscPair | None:
        return self._items[0] if self._items else None

    def clear(self) -> None:
        self._items.clear()

    def snapshot(self) -> tuple[AscPair, ...]:
        return tuple(self._items)
