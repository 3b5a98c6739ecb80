"""The controller's durable state: what each volume was created as, and where it is published.

One JSON document in ``<state-dir>/csi-controller-state.json``::

    {"version": 1,
     "volumes": {"<volume id>": {
         "context": {"fsType": "ext4"},
         "source": {"kind": "snapshot" | "volume" | "", "id": "<source id>"},
         "attachments": {"<node id>": {"readonly": false, "access_type": "block",
                                        "mode": "MULTI_NODE_MULTI_WRITER"}}}}}

Every change rewrites the document atomically (write a temporary file in the same directory,
fsync it, rename it over the old one, fsync the directory), so a crash at any point leaves
either the old or the new state and a controller restart keeps every publication. The file is
read once at start; what it holds is checked against bounds and types before use.

Not thread-safe: the controller calls it from one event loop. A save blocks that loop for one
small write and two fsyncs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from blockyard.csi.errors import StateFileError
from blockyard.errors import BlockyardError
from blockyard.fileutil import atomic_write

STATE_FILE_NAME: Final = "csi-controller-state.json"
STATE_VERSION: Final = 1
#: Far above what a cluster's worth of volumes needs; a larger file is not ours.
MAX_STATE_FILE_BYTES: Final = 64 << 20
MAX_VOLUMES: Final = 100_000
#: Nodes one volume may be published to (MULTI_NODE_READER_ONLY fans out widest).
MAX_ATTACHMENTS_PER_VOLUME: Final = 1024
#: CSI spec "Size Limits": 128 bytes per string, 4 KiB per map.
MAX_ID_BYTES: Final = 128
MAX_CONTEXT_BYTES: Final = 4096
SOURCE_KINDS: Final = ("", "snapshot", "volume")


@dataclass(frozen=True, slots=True)
class Attachment:
    """One ControllerPublishVolume that holds: the volume is published to ``node_id``."""

    node_id: str
    readonly: bool
    access_type: str
    mode: str


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    context: dict[str, str] = field(default_factory=dict)
    source_kind: str = ""
    source_id: str = ""
    attachments: dict[str, Attachment] = field(default_factory=dict)


class PublishStore:
    """Volume records and attachments, durable on return of every mutating method."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE_NAME
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateFileError(
                f"cannot create the CSI state directory {state_dir}: {exc}; point --state-dir "
                "at a writable directory on persistent storage"
            ) from exc
        self._volumes: dict[str, VolumeRecord] = self._load()

    # ---- reads -----------------------------------------------------------------------------

    def get(self, volume_id: str) -> VolumeRecord | None:
        return self._volumes.get(volume_id)

    def attachments(self, volume_id: str) -> dict[str, Attachment]:
        record = self._volumes.get(volume_id)
        return dict(record.attachments) if record else {}

    def published_node_ids(self, volume_id: str) -> list[str]:
        return sorted(self.attachments(volume_id))

    def volume_ids(self) -> list[str]:
        return sorted(self._volumes)

    # ---- writes ----------------------------------------------------------------------------

    def put_volume(
        self, volume_id: str, context: dict[str, str], source_kind: str, source_id: str
    ) -> VolumeRecord:
        """Record how ``volume_id`` was created, keeping its attachments."""
        assert source_kind in SOURCE_KINDS, source_kind
        old = self._volumes.get(volume_id)
        if old is None and len(self._volumes) >= MAX_VOLUMES:
            raise StateFileError(
                f"the CSI state holds {MAX_VOLUMES} volumes already; delete unused volumes"
            )
        record = VolumeRecord(
            dict(context), source_kind, source_id, dict(old.attachments) if old else {}
        )
        self._commit(volume_id, record)
        return record

    def attach(self, volume_id: str, attachment: Attachment) -> None:
        record = self._volumes.get(volume_id) or VolumeRecord()
        if (
            attachment.node_id not in record.attachments
            and len(record.attachments) >= MAX_ATTACHMENTS_PER_VOLUME
        ):
            raise StateFileError(
                f"volume {volume_id} is published to {MAX_ATTACHMENTS_PER_VOLUME} nodes already"
            )
        attachments = dict(record.attachments)
        attachments[attachment.node_id] = attachment
        self._commit(volume_id, replace(record, attachments=attachments))

    def detach(self, volume_id: str, node_id: str = "") -> list[str]:
        """Forget the publication to ``node_id`` (every node when empty); returns the nodes
        that were forgotten."""
        record = self._volumes.get(volume_id)
        if record is None:
            return []
        gone = [n for n in record.attachments if not node_id or n == node_id]
        if gone:
            kept = {n: a for n, a in record.attachments.items() if n not in gone}
            self._commit(volume_id, replace(record, attachments=kept))
        return gone

    def remove_volume(self, volume_id: str) -> None:
        if volume_id in self._volumes:
            self._commit(volume_id, None)

    # ---- persistence -----------------------------------------------------------------------

    def _commit(self, volume_id: str, record: VolumeRecord | None) -> None:
        """Apply one change durably; memory changes only once the file holds it."""
        volumes = dict(self._volumes)
        if record is None:
            volumes.pop(volume_id, None)
        else:
            volumes[volume_id] = record
        self._save(volumes)
        self._volumes = volumes

    def _save(self, volumes: dict[str, VolumeRecord]) -> None:
        document = {
            "version": STATE_VERSION,
            "volumes": {
                vid: {
                    "context": rec.context,
                    "source": {"kind": rec.source_kind, "id": rec.source_id},
                    "attachments": {
                        node: {"readonly": a.readonly, "access_type": a.access_type, "mode": a.mode}
                        for node, a in sorted(rec.attachments.items())
                    },
                }
                for vid, rec in sorted(volumes.items())
            },
        }
        data = json.dumps(document, indent=1, sort_keys=True).encode()
        try:
            atomic_write(str(self.path), data, mode=0o600)
        except (BlockyardError, OSError) as exc:
            raise StateFileError(
                f"cannot write the CSI state file {self.path}: {exc}; the change was not made. "
                "Free space or fix permissions on --state-dir, then retry"
            ) from exc

    def _load(self) -> dict[str, VolumeRecord]:
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_STATE_FILE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateFileError(f"cannot read the CSI state file {self.path}: {exc}") from exc
        if len(data) > MAX_STATE_FILE_BYTES:
            raise self._corrupt(f"it is larger than {MAX_STATE_FILE_BYTES} bytes")
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"it is not JSON ({exc})") from exc
        return self._parse(document)

    def _corrupt(self, why: str) -> StateFileError:
        return StateFileError(
            f"the CSI state file {self.path} is damaged: {why}. It records which nodes volumes "
            "are published to; restore it from a backup, or move it aside to start with no "
            "publications (Kubernetes then republishes volumes that are in use)"
        )

    def _parse(self, document: Any) -> dict[str, VolumeRecord]:
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise self._corrupt(f"it is not a version {STATE_VERSION} state document")
        volumes = document.get("volumes")
        if not isinstance(volumes, dict) or len(volumes) > MAX_VOLUMES:
            raise self._corrupt(f"'volumes' is not a map of at most {MAX_VOLUMES} entries")
        out: dict[str, VolumeRecord] = {}
        for vid, raw in volumes.items():
            if not _is_id(vid) or not isinstance(raw, dict):
                raise self._corrupt(f"volume entry {str(vid)[:64]!r} is malformed")
            context = raw.get("context", {})
            source = raw.get("source", {})
            attachments = raw.get("attachments", {})
            if (
                not isinstance(context, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())
                or len(json.dumps(context)) > MAX_CONTEXT_BYTES
                or not isinstance(source, dict)
                or source.get("kind", "") not in SOURCE_KINDS
                or not isinstance(source.get("id", ""), str)
                or not isinstance(attachments, dict)
                or len(attachments) > MAX_ATTACHMENTS_PER_VOLUME
            ):
                raise self._corrupt(f"volume {vid!r} has a malformed record")
            parsed: dict[str, Attachment] = {}
            for node, att in attachments.items():
                if (
                    not _is_id(node)
                    or not isinstance(att, dict)
                    or not isinstance(att.get("readonly"), bool)
                    or att.get("access_type") not in ("block", "mount")
                    or not isinstance(att.get("mode"), str)
                ):
                    raise self._corrupt(f"volume {vid!r} has a malformed attachment")
                parsed[node] = Attachment(node, att["readonly"], att["access_type"], att["mode"])
            out[vid] = VolumeRecord(
                dict(context), source.get("kind", ""), source.get("id", ""), parsed
            )
        return out


def _is_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value.encode()) <= MAX_ID_BYTES
