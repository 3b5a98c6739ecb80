"""Geometry and limits of a volume. Every bound the engine enforces is named here.

Units go last in names (``_bytes``, ``_s``, ``_count``).
"""

from __future__ import annotations

# SBC-4 §6.6.2 READ CAPACITY (16): initiators and the libiscsi conformance suite expect 512-byte
# logical blocks; we report 4 KiB physical blocks (LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 3).
LOGICAL_BLOCK_SIZE = 512
#: The engine's unit of mapping, COW and WAL images: one physical block.
BLOCK_SIZE = 4096
SECTORS_PER_BLOCK = BLOCK_SIZE // LOGICAL_BLOCK_SIZE
#: Torn writes happen at this granularity; every on-disk structure is aligned to it.
SECTOR_SIZE = 512

MIN_VOLUME_SIZE_BYTES = 1 << 20
#: ext4 caps a file at 16 TiB with 4 KiB blocks; the data region sits behind the WAL in one file.
MAX_VOLUME_SIZE_BYTES = (16 << 40) - (1 << 30)

MIN_WAL_SIZE_BYTES = 64 << 10
MAX_WAL_SIZE_BYTES = 1 << 30
DEFAULT_WAL_SIZE_MAX_BYTES = 64 << 20
DEFAULT_WAL_SIZE_MIN_BYTES = 1 << 20

#: One request may move at most this much (reported as MAXIMUM TRANSFER LENGTH, SBC-4 §6.6.4).
MAX_TRANSFER_BYTES = 8 << 20
MAX_TRANSFER_BLOCKS = MAX_TRANSFER_BYTES // LOGICAL_BLOCK_SIZE
#: A WAL record's payload cap; larger writes become several records. Also capped to a quarter
#: of the WAL so any record fits into an empty WAL even across the wrap point.
MAX_RECORD_PAYLOAD_BYTES = 1 << 20

#: Unmaps up to this many physical blocks are logged in the WAL like writes; larger ones drain
#: the WAL and punch the data region directly, so mkfs discarding a whole device costs O(extents).
WAL_UNMAP_MAX_BLOCKS = 256

#: Write-same with a non-zero pattern is expanded in chunks of this size.
WRITE_SAME_CHUNK_BYTES = 1 << 20

NAME_MAX_CHARS = 128
SNAPSHOT_MAX_COUNT = 128

DEFAULT_BACKPRESSURE_TIMEOUT_S = 30.0
DEFAULT_FLUSH_TIMEOUT_S = 60.0
#: The flusher checkpoints when the WAL is this full, or after the idle interval.
FLUSH_HIGH_WATERMARK = 0.25
FLUSH_IDLE_INTERVAL_S = 0.2
CLOSE_TIMEOUT_S = 60.0
#: WAL retention for replication feeds (see engine/replication_source.py): at most this share
#: of the WAL and this long, then a lagging replica's missed writes go to its bitmap instead.
#: Half the WAL leaves writers the other half, so retention never blocks them; five minutes
#: rides out a replica restart (SeaweedFS holds 5 minutes or 64 MB and then rebuilds in full;
#: past our bound the replica resyncs only what it missed).
RETENTION_MAX_FRACTION = 0.5
RETENTION_MAX_S = 300.0
#: A failing checkpoint (a full disk) is retried this often; the WAL keeps the records meanwhile.
CHECKPOINT_RETRY_S = 1.0
#: Longest a group-commit leader waits for sibling flushers before its fdatasync.
GROUP_COMMIT_DELAY_MAX_S = 0.004


def default_wal_size(size_bytes: int) -> int:
    """WAL size for a new volume: 1/16 of it, within [1 MiB, 64 MiB], 4 KiB aligned."""
    wal = min(DEFAULT_WAL_SIZE_MAX_BYTES, max(DEFAULT_WAL_SIZE_MIN_BYTES, size_bytes // 16))
    return wal - wal % BLOCK_SIZE
