"""Roles and the epoch rules that fence them.

An epoch only moves forward. A volume's role says what it does for replication: a primary takes
client writes, a replica takes shipped writes, a rebuilding volume is being copied into.
"""

from __future__ import annotations

import enum

from blockyard.errors import EpochRegressionError, InvalidRoleTransitionError


class Role(enum.IntEnum):
    NONE = 0
    PRIMARY = 1
    REPLICA = 2
    REBUILDING = 3


#: Allowed role changes. NONE→REBUILDING is allowed: a fresh server joining as a rebuild target
#: starts with no role. A stale primary goes to REBUILDING (or REPLICA) after a failover.
_TRANSITIONS: dict[Role, frozenset[Role]] = {
    Role.NONE: frozenset({Role.NONE, Role.PRIMARY, Role.REPLICA, Role.REBUILDING}),
    Role.PRIMARY: frozenset({Role.PRIMARY, Role.NONE, Role.REPLICA, Role.REBUILDING}),
    Role.REPLICA: frozenset({Role.REPLICA, Role.NONE, Role.PRIMARY, Role.REBUILDING}),
    Role.REBUILDING: frozenset({Role.REBUILDING, Role.NONE, Role.REPLICA}),
}


def check_epoch_advance(volume: str, current: int, new: int) -> None:
    if new < current:
        raise EpochRegressionError(
            f"volume {volume!r} is at epoch {current}; refusing to move it back to {new}. "
            "Epochs only move forward: fetch the current epoch from the master and retry"
        )


def check_role_transition(
    volume: str, current: Role, new: Role, current_epoch: int, new_epoch: int
) -> None:
    """Raise unless ``current → new`` at ``current_epoch → new_epoch`` is allowed.

    Promotion of a replica must bump the epoch: without a new epoch the old primary's in-flight
    writes could not be fenced off.
    """
    check_epoch_advance(volume, current_epoch, new_epoch)
    if new not in _TRANSITIONS[current]:
        allowed = ", ".join(r.name.lower() for r in sorted(_TRANSITIONS[current]))
        raise InvalidRoleTransitionError(
            f"volume {volume!r} cannot go from {current.name.lower()} to {new.name.lower()}; "
            f"allowed from {current.name.lower()}: {allowed}"
        )
    if current is Role.REPLICA and new is Role.PRIMARY and new_epoch <= current_epoch:
        raise InvalidRoleTransitionError(
            f"promoting volume {volume!r} to primary needs a new epoch above {current_epoch} "
            "so the old primary is fenced; pass epoch > current"
        )
