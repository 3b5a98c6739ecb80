"""The crash-safe volume engine: one file per volume with a superblock, a WAL and a data region.

Synchronous and thread-safe; see :mod:`blockyard.engine.volume` for the durability contract.
"""

from blockyard.engine.epoch import Role
from blockyard.engine.snapshot_ops import SnapshotInfo
from blockyard.engine.store import VolumeInfo, VolumeStore
from blockyard.engine.volume import Volume, WalRecord

__all__ = ["Role", "SnapshotInfo", "Volume", "VolumeInfo", "VolumeStore", "WalRecord"]
