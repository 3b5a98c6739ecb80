"""What an iSCSI listener serves: :class:`ServedTarget` (login configuration plus logical unit)
per IQN, looked up through a :class:`TargetRegistry` that the volume manager owns."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from blockyard.iscsi.login import TargetConfig
from blockyard.scsi.lu import LogicalUnit


@dataclass(frozen=True, slots=True)
class ServedTarget:
    """What the server exports under one IQN: the login configuration (name, CHAP, ACL,
    portal group tag) and the logical unit behind LUN 0."""

    config: TargetConfig
    logical_unit: LogicalUnit

    @property
    def name(self) -> str:
        return self.config.name


class TargetRegistry(Protocol):
    """Maps IQNs to what to serve. Must be thread-safe and quick: it is called on the loop.

    Removing a target stops new logins at once; existing sessions continue until the owner
    calls :meth:`IscsiServer.drop_sessions`.
    """

    def lookup(self, target_name: str) -> ServedTarget | None: ...

    def targets(self) -> Sequence[ServedTarget]: ...


class DictTargetRegistry:
    """A :class:`TargetRegistry` kept in a dict under a lock. Thread-safe."""

    def __init__(self, targets: Sequence[ServedTarget] = ()) -> None:
        self._lock = threading.Lock()
        self._targets: dict[str, ServedTarget] = {t.name: t for t in targets}

    def add(self, target: ServedTarget) -> None:
        """Export ``target``; an existing target of the same name is replaced."""
        with self._lock:
            self._targets[target.name] = target

    def remove(self, target_name: str) -> ServedTarget | None:
        with self._lock:
            return self._targets.pop(target_name, None)

    def lookup(self, target_name: str) -> ServedTarget | None:
        with self._lock:
            return self._targets.get(target_name)

    def targets(self) -> Sequence[ServedTarget]:
        with self._lock:
            return tuple(self._targets.values())
