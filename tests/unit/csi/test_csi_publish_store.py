"""The controller's durable state: survives reopening, writes atomically, refuses damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blockyard.csi.errors import StateFileError
from blockyard.csi.publish_store import STATE_FILE_NAME, Attachment, PublishStore

A = Attachment("node-a", False, "block", "MULTI_NODE_MULTI_WRITER")
B = Attachment("node-b", True, "block", "MULTI_NODE_MULTI_WRITER")


def test_records_and_attachments_survive_reopening(tmp_path: Path) -> None:
    store = PublishStore(tmp_path)
    store.put_volume("v", {"fsType": "xfs"}, "snapshot", "s@1")
    store.attach("v", A)
    store.attach("v", B)
    store.attach("w", A)  # a volume without a creation record (made outside CSI)
    again = PublishStore(tmp_path)
    record = again.get("v")
    assert record is not None
    assert record.context == {"fsType": "xfs"}
    assert (record.source_kind, record.source_id) == ("snapshot", "s@1")
    assert record.attachments == {"node-a": A, "node-b": B}
    assert again.published_node_ids("w") == ["node-a"]
    assert again.volume_ids() == ["v", "w"]


def test_put_volume_keeps_attachments_and_detach(tmp_path: Path) -> None:
    store = PublishStore(tmp_path)
    store.attach("v", A)
    store.put_volume("v", {}, "", "")
    assert store.published_node_ids("v") == ["node-a"]
    store.attach("v", B)
    assert store.detach("v", "node-a") == ["node-a"]
    assert store.detach("v", "node-a") == []
    assert store.detach("missing") == []
    store.attach("v", A)
    assert sorted(store.detach("v")) == ["node-a", "node-b"]  # every node
    store.remove_volume("v")
    store.remove_volume("v")
    assert PublishStore(tmp_path).get("v") is None


def test_writes_are_atomic_and_leave_no_temporaries(tmp_path: Path) -> None:
    store = PublishStore(tmp_path)
    for i in range(20):
        store.attach(f"v{i}", A)
    assert sorted(os.listdir(tmp_path)) == [STATE_FILE_NAME]
    document = json.loads((tmp_path / STATE_FILE_NAME).read_text())
    assert document["version"] == 1 and len(document["volumes"]) == 20


def test_failed_write_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = PublishStore(tmp_path)
    store.attach("v", A)

    def disk_full(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StateFileError, match="was not made"):
        store.attach("v", B)
    monkeypatch.undo()
    assert store.published_node_ids("v") == ["node-a"]
    assert PublishStore(tmp_path).published_node_ids("v") == ["node-a"]
    assert sorted(os.listdir(tmp_path)) == [STATE_FILE_NAME], "the temporary file is removed"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b'{"version": 2, "volumes": {}}',
        b'{"version": 1, "volumes": []}',
        b'{"version": 1, "volumes": {"v": {"attachments": {"n": {"readonly": 1}}}}}',
        b'{"version": 1, "volumes": {"v": {"source": {"kind": "tape"}}}}',
        b'{"version": 1, "volumes": {"v": {"context": {"k": 5}}}}',
        b'{"version": 1, "volumes": {"": {}}}',
    ],
)
def test_damaged_state_is_refused_with_advice(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATE_FILE_NAME).write_bytes(content)
    with pytest.raises(StateFileError, match=r"damaged.*move it aside"):
        PublishStore(tmp_path)


def test_unusable_state_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateFileError, match="--state-dir"):
        PublishStore(tmp_path / "file" / "sub")
