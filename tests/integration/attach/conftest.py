"""Fixtures for attach integration tests: real FUSE, real loop devices, real processes.

Every test gets its own state root and data dir under tmp_path; the finalizer kills the attach
daemons of that state root (by pid), removes what they left, and asserts nothing leaked: no
loop device or mount that was not there before, no daemon process.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from attach_helpers import AttachEnv, daemon_pids, kill_and_wait, snapshot

from blockyard.attach import loop as loopmod
from blockyard.attach import manager, mounts


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "needs /dev/fuse and /dev/loop-control"
    for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "fusermount3", "blkid"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if importlib.util.find_spec("mfusepy") is None:
        return "needs mfusepy"
    return None


_REASON = _missing()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture
def attach_env(tmp_path: Path) -> Iterator[AttachEnv]:
    if _REASON is not None:
        pytest.skip(_REASON)
    env = AttachEnv(root=str(tmp_path / "state"), data_dir=str(tmp_path / "data"), tmp=tmp_path)
    before = snapshot(env.root)
    yield env
    kill_and_wait(daemon_pids(env.root))
    manager.cleanup(env.root, force=True)
    # Anything still under tmp_path (test mountpoints, foreign test loops) goes too.
    for m in sorted(mounts.mounts_under(str(tmp_path)), key=lambda m: -len(m.mountpoint)):
        mounts.unmount(m.mountpoint, lazy=True)
    for li in loopmod.loops_backed_under(str(tmp_path)):
        loopmod.run_tool(["losetup", "-d", li.device], check=False)
    after = snapshot(env.root)
    assert after.daemons == before.daemons, f"leaked daemons {after.daemons - before.daemons}"
    assert after.mounts <= before.mounts, f"leaked mounts {after.mounts - before.mounts}"
    leaked = {lo for lo in after.loops - before.loops if str(tmp_path) in lo[1]}
    assert not leaked, f"leaked loop devices {leaked}"
