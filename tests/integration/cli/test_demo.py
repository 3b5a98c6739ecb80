"""README's main command, `bash scripts/demo.sh`, run as CI runs the suite: the failover demo on
a `blockyard up` cluster must end with PASS and exit 0 (it exits non-zero with FAIL on any
failed step), and must leave no process and no attachment behind."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: The demo itself waits at most 120 s per step; this bounds the whole run on a busy machine.
DEMO_TIMEOUT_S = 280.0


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    if not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control"):
        return "needs /dev/fuse and /dev/loop-control"
    for tool in ("losetup", "mkfs.ext4", "fusermount3", "blkid", "sha256sum"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_demo_sh_passes_and_cleans_up(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        cwd=ROOT,
        env=dict(os.environ, BLOCKYARD_DEMO_DIR=str(data)),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert out.rstrip().splitlines()[-1].startswith("PASS: failover demo"), out[-2000:]
    assert "primary moved:" in out and "all 16 files verified" in out, out[-2000:]
    assert not (data / "cluster" / "cluster.env").exists()
    leftovers = subprocess.run(
        ["pgrep", "-f", str(data)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert leftovers == [], f"processes left behind: {leftovers}"
    mounts = Path("/proc/mounts").read_text()
    assert str(data) not in mounts
