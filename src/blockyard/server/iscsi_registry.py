"""What an iSCSI listener serves: :class:`ServedTarget` (login configuration plus logical unit)
per IQN, looked up through a :class:`TargetRegistry` that the volume manager owns, and
:class:`RegistryPortal`, the sans-IO connection's view of it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from blockyard.iscsi.discovery import DiscoveryTarget, Portal, send_targets_pairs
from blockyard.iscsi.login import TargetConfig
from blockyard.iscsi.target_session import CommandInspector
from blockyard.iscsi.text import TextPairs
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


class RegistryPortal:
    """The sans-IO connection's view of the server (a ``TargetPortal``), one per connection: it
    knows which local address to advertise in SendTargets."""

    def __init__(
        self, registry: TargetRegistry, allocate_tsih: Callable[[], int], host: str, port: int
    ) -> None:
        self._registry = registry
        self.allocate_tsih = allocate_tsih
        self._host = host
        self._port = port

    def lookup(self, target_name: str) -> TargetConfig | None:
        target = self._registry.lookup(target_name)
        return None if target is None else target.config

    def inspector(self, target_name: str) -> CommandInspector | None:
        target = self._registry.lookup(target_name)
        return None if target is None else target.logical_unit

    def send_targets(
        self, value: str, *, initiator_name: str, session_target: str | None
    ) -> TextPairs:
        visible = [
            DiscoveryTarget(t.name, (Portal(self._host, self._port, t.config.portal_group_tag),))
            for t in self._registry.targets()
            if t.config.allowed_initiators is None or initiator_name in t.config.allowed_initiators
        ]
        return send_targets_pairs(value, visible, session_target=session_target)
