"""Upgrade safety and restart recovery of the node plugin (mountpoint-s3 CSI's upgrade test).

While a writer appends a timestamp every 100 ms (with fsync) to a file on a published ext4
volume, the node plugin is killed with SIGKILL and replaced, then stopped with SIGTERM and
replaced again. The mount (its mount id), the target's inode, the writer's open file handle
and the attach daemon must all survive, and consecutive timestamps must never be more than
0.15 s apart. Then the last plugin unpublishes and unstages the volume staged two plugins ago
and leaves nothing behind."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from csi_helpers import Stack
from csi_node_support import (
    NodePlugin,
    controller_publish,
    controller_unpublish,
    create_volume,
    fs_cap,
    leftovers,
    mount_id_of,
    publish,
    scrub,
    stage,
    unpublish,
    unstage,
)

from blockyard.attach import manager
from blockyard.csi.proto import csi_pb2 as pb

MAX_GAP_S = 0.15
WRITER_PERIOD_S = 0.1
SIGTERM_BOUND_S = 30.0
WRITER = r"""
import os, sys, time
path, stop, result = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
ino = os.fstat(fd).st_ino
print("started", flush=True)
next_tick = time.monotonic()
deadline = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    os.write(fd, f"{time.time():.6f}\n".encode())
    os.fsync(fd)
    next_tick += 0.1
    time.sleep(max(0.0, next_tick - time.monotonic()))
same = os.fstat(fd).st_ino == ino
os.write(fd, b"end\n")
os.fsync(fd)
os.close(fd)
with open(result, "w") as f:
    f.write("handle-ok" if same else "handle-changed")
"""


@pytest.fixture
def node(stack: Stack, tmp_path: Path) -> Iterator[NodePlugin]:
    plugin = NodePlugin(tmp_path / "u", "node-u").start()
    try:
        yield plugin
    finally:
        if plugin.csi is not None:
            plugin.stop()
        scrub(tmp_path)
    assert not leftovers(tmp_path)


def daemon_pids(node: NodePlugin) -> dict[str, int]:
    return {
        a.id: a.state.daemon_pid
        for a in manager.list_attachments(str(node.attach_dir))
        if a.state is not None and a.healthy
    }


def test_restarts_keep_io_and_unstage_after_restart(
    stack: Stack, node: NodePlugin, tmp_path: Path
) -> None:
    cap = fs_cap("ext4")
    volume = create_volume(stack, "upgrade-vol", cap)
    vid = volume.volume_id
    stage(node, volume, cap, controller_publish(stack, vid, node, cap))
    target = publish(node, vid, cap)
    mount_id = mount_id_of(target)
    target_ino = os.stat(target).st_ino
    daemons = daemon_pids(node)
    assert mount_id is not None and len(daemons) == 1

    log_file = os.path.join(target, "timestamps.log")
    stop_file, result_file = tmp_path / "stop", tmp_path / "result"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, log_file, str(stop_file), str(result_file)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "started"
        time.sleep(1.0)
        events = [("kill", time.time())]
        assert node.stop(signal.SIGKILL) == -signal.SIGKILL
        events.append(("start", time.time()))
        node.start()
        events.append(("started", time.time()))
        time.sleep(1.0)
        start = time.monotonic()
        events.append(("term", time.time()))
        assert node.stop(signal.SIGTERM) == 0, node.stderr()
        stop_s = time.monotonic() - start
        assert stop_s < SIGTERM_BOUND_S
        events.append(("start", time.time()))
        node.start()
        events.append(("started", time.time()))
        time.sleep(1.0)
    finally:
        stop_file.touch()
        writer.wait(timeout=30)
        if writer.stdout is not None:
            writer.stdout.close()
    assert writer.returncode == 0
    assert result_file.read_text() == "handle-ok"
    assert mount_id_of(target) == mount_id
    assert os.stat(target).st_ino == target_ino
    assert daemon_pids(node) == daemons

    lines = Path(log_file).read_text().split()
    assert lines[-1] == "end"
    stamps = [float(x) for x in lines[:-1]]
    assert len(stamps) >= 25
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    print(f"timestamps {len(stamps)}, max gap {max(gaps):.3f} s, SIGTERM stop {stop_s:.2f} s")
    worst = sorted(zip(gaps, stamps, strict=False), reverse=True)[:3]
    assert max(gaps) <= MAX_GAP_S, (worst, events)

    # The third plugin unpublishes and unstages what the first one staged.
    unpublish(node, vid, target)
    unstage(node, vid)
    assert not leftovers(node.root)
    assert not list((node.root / "state" / "volumes").glob("*.json"))
    controller_unpublish(stack, vid, node)
    stack.csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid), timeout=60)
