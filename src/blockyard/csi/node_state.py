"""What the node has staged, on disk, so a restarted (or upgraded) plugin carries on.

``DIR/volumes/<volume>.json`` holds one :class:`StagedVolume`, written atomically (temporary
file, fsync, rename) once the volume is attached and again once it is staged. A block volume
also gets ``<staging path>/blockyard-block.json`` naming its device, so the staging directory
alone tells what it holds.

The truth about attachments stays with the attach layer (its daemons and state root): these
records only say which attachment and which staging path belong to which volume, which is what
NodeUnstageVolume, NodePublishVolume and NodeExpandVolume need after a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from blockyard.csi.errors import StateFileError

RECORD_VERSION: Final = 1
RECORD_MAX_BYTES: Final = 64 << 10
BLOCK_INFO_FILE: Final = "blockyard-block.json"


@dataclass(frozen=True, slots=True)
class StagedVolume:
    volume_id: str
    staging_path: str
    #: ``block`` or ``mount``.
    access_type: str
    fs_type: str
    #: ``userspace`` (attachment_id names the attach daemon) or ``kernel``.
    attach_kind: str
    device: str
    attachment_id: str = ""
    iqn: str = ""
    portals: list[str] = field(default_factory=list)
    lun: int = 0
    mount_flags: list[str] = field(default_factory=list)
    #: ``attached`` while NodeStageVolume runs, ``staged`` once it answered OK.
    status: str = "attached"
    version: int = RECORD_VERSION

    def with_(self, **changes: Any) -> StagedVolume:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StagedVolume:
        if raw.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown record version {raw.get('version')!r}")
        return cls(
            volume_id=str(raw["volume_id"]),
            staging_path=str(raw["staging_path"]),
            access_type=str(raw["access_type"]),
            fs_type=str(raw.get("fs_type", "")),
            attach_kind=str(raw["attach_kind"]),
            device=str(raw["device"]),
            attachment_id=str(raw.get("attachment_id", "")),
            iqn=str(raw.get("iqn", "")),
            portals=[str(p) for p in raw.get("portals", [])],
            lun=int(raw.get("lun", 0)),
            mount_flags=[str(f) for f in raw.get("mount_flags", [])],
            status=str(raw.get("status", "attached")),
        )


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class NodeStateStore:
    """The staged-volume records. Callers serialise per volume (operation locks)."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / "volumes"
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateFileError(
                f"cannot create the node state directory {self.directory}: {exc}; check "
                "--node-state-dir (a writable host path, /run/blockyard/csi-node by default)"
            ) from exc

    def _path(self, volume_id: str) -> Path:
        return self.directory / f"{volume_id}.json"

    def get(self, volume_id: str) -> StagedVolume | None:
        path = self._path(volume_id)
        try:
            with path.open("rb") as f:
                data = f.read(RECORD_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"cannot read {path}: {exc}") from exc
        damaged = (
            f"the staged-volume record {path} is damaged; inspect it, unmount and detach the "
            "volume by hand (`blockyard detach`), then delete the file"
        )
        if len(data) > RECORD_MAX_BYTES:
            raise StateFileError(f"{damaged} (larger than {RECORD_MAX_BYTES} bytes)")
        try:
            return StagedVolume.from_dict(json.loads(data))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StateFileError(f"{damaged} ({exc})") from exc

    def put(self, record: StagedVolume) -> None:
        try:
            write_json_atomic(self._path(record.volume_id), asdict(record))
        except OSError as exc:
            raise StateFileError(f"cannot write {self._path(record.volume_id)}: {exc}") from exc

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(volume_id).unlink()

    def all(self) -> list[StagedVolume]:
        out: list[StagedVolume] = []
        for path in sorted(self.directory.glob("*.json")):
            record = self.get(path.stem)
            if record is not None:
                out.append(record)
        return out
