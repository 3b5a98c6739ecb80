"""The seam the node layer attaches volumes through, for both initiator paths.

:class:`LunAttacher` is implemented by :class:`~blockyard.attach.initiator.kernel.
KernelAttacher` (open-iscsi + dm-multipath: the result is a kernel block device node) and by
:class:`UserspaceAttacher` (blockyard's own initiator: the result is an in-process
:class:`~blockyard.blockdev.BlockDevice`, which the FUSE daemon exposes as a file for a loop
device). Both refuse any IQN outside the node's managed prefix (rds-csi's lesson: never touch
what you do not own).
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from blockyard.attach.initiator.blockdev import IscsiBlockDevice, IscsiVolumeSpec
from blockyard.attach.initiator.errors import ManagedPrefixError
from blockyard.blockdev import BlockDevice
from blockyard.iscsi.discovery import is_valid_iscsi_name


@dataclass(frozen=True, slots=True)
class AttachedLun:
    """An attached LUN: ``device`` is the kernel node (kernel path), ``block_device`` the
    in-process device (userspace path); exactly one is set."""

    target_name: str
    naa: str
    device: Path | None = None
    block_device: BlockDevice | None = None


class LunAttacher(Protocol):
    """Attach and detach LUNs. Every method is idempotent and safe to retry after a crash."""

    def attach(self, spec: IscsiVolumeSpec) -> AttachedLun:
        """Log in on every portal of ``spec`` and return the device."""
        ...

    def detach(self, target_name: str) -> None:
        """Log out every session of ``target_name``; detaching what is not attached is fine."""
        ...

    def attached(self) -> list[str]:
        """IQNs inside the managed prefix that have sessions now."""
        ...

    def cleanup_orphans(self, keep: Collection[str]) -> list[str]:
        """Detach every managed IQN not in ``keep``; foreign IQNs are never considered.
        Returns the IQNs detached."""
        ...


class ManagedPrefix:
    """The IQN prefix this node owns, e.g. ``iqn.2026-11.io.blockyard:``.

    Construction refuses an empty or malformed prefix: without a valid one nothing could be
    proven to be ours, so the attacher must not start.
    """

    def __init__(self, prefix: str) -> None:
        probe = prefix if prefix.endswith(":") else prefix + ":"
        if not prefix or not is_valid_iscsi_name(probe + "x") or ":" in probe[:-1]:
            raise ManagedPrefixError(
                f"managed IQN prefix {prefix!r} is not valid: configure one like "
                "'iqn.2026-11.io.blockyard' (an IQN without the ':' part); without it the node "
                "cannot tell its volumes from the host's own"
            )
        self.prefix = probe

    def owns(self, iqn: str) -> bool:
        return iqn.startswith(self.prefix) and len(iqn) > len(self.prefix)

    def require(self, iqn: str, action: str) -> None:
        if not self.owns(iqn):
            raise ManagedPrefixError(
                f"refusing to {action} {iqn!r}: it is outside the managed prefix "
                f"{self.prefix!r}, so this node does not own it"
            )


class UserspaceAttacher:
    """:class:`LunAttacher` over :class:`IscsiBlockDevice`; the sessions live in this process.
    Thread-safe."""

    def __init__(self, managed_prefix: str) -> None:
        self._prefix = ManagedPrefix(managed_prefix)
        self._lock = threading.Lock()
        self._devices: dict[str, IscsiBlockDevice] = {}

    def attach(self, spec: IscsiVolumeSpec) -> AttachedLun:
        self._prefix.require(spec.target_name, "log in to")
        with self._lock:
            device = self._devices.get(spec.target_name)
        if device is None:
            device = IscsiBlockDevice(spec)
            with self._lock:
                existing = self._devices.setdefault(spec.target_name, device)
            if existing is not device:
                device.close()
                device = existing
        return AttachedLun(spec.target_name, device.naa, block_device=device)

    def detach(self, target_name: str) -> None:
        self._prefix.require(target_name, "log out of")
        with self._lock:
            device = self._devices.pop(target_name, None)
        if device is not None:
            device.close()

    def attached(self) -> list[str]:
        with self._lock:
            return sorted(self._devices)

    def cleanup_orphans(self, keep: Collection[str]) -> list[str]:
        orphans = [iqn for iqn in self.attached() if self._prefix.owns(iqn) and iqn not in keep]
        for iqn in orphans:
            self.detach(iqn)
        return orphans


__all__ = ["AttachedLun", "LunAttacher", "ManagedPrefix", "UserspaceAttacher"]
