"""``blockyard bench replication`` runs end to end with tiny settings: three real servers, every
phase, and a report that has every row, each with a figure and every goal with a verdict."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 280.0
SETUPS = ("RF1 (no replica)", "RF2 best_effort", "RF2 sync_all", "RF3 sync_quorum")
NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"


def test_bench_replication_prints_every_row(tmp_path: Path) -> None:
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install qemu-utils")
    argv = [sys.executable, "-m", "blockyard.cli.main", "bench", "replication"]
    argv += ["--dir", str(tmp_path), "--size", "64MiB", "--rebuild-size", "64MiB"]
    argv += ["--seconds", "0.1", "--rounds", "1", "--missed-writes", "300"]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    lines = out.splitlines()

    def rows(label: str) -> list[str]:
        return [line for line in lines if line.strip().startswith(label)]

    for setup in SETUPS:
        found = rows(setup)
        # QD32 row, QD1 FUA row, QD1 plain-write row, CPU row.
        assert len(found) == 4, (setup, out)
        for row in found[:3]:
            assert re.search(rf"{NUMBER} \[{NUMBER}-{NUMBER}\]", row), row
            assert re.search(rf"{NUMBER}x \[{NUMBER}-{NUMBER}\]", row), row
        assert re.search(rf"p50 {NUMBER}x \[{NUMBER}-{NUMBER}\]", found[2]), found[2]
        assert "CPUs busy" in found[3], found[3]
    sync_all_qd32, sync_all_qd1 = rows("RF2 sync_all")[:2]
    for row in (sync_all_qd32, sync_all_qd1):
        assert re.search(r">= 0\.70x RF1 \([0-9.]+x\): (met|NOT MET)$", row), row
    assert re.search(rf"p50 {NUMBER}x \[{NUMBER}-{NUMBER}\]", sync_all_qd1), sync_all_qd1
    assert re.search(r"link reconnected -> in_sync [0-9.]+ s +goal < 2 s: (met|NOT MET)", out)
    assert re.search(r"READY -> in_sync [0-9.]+ s", out)
    assert re.search(r"replica [0-9,]+ LSNs behind; plan (catch_up|delta|full)", out), out
    dense, sparse = rows("dense"), rows("sparse ")
    assert dense and re.search(rf"{NUMBER} MB/s of data.*goal >= 500 MB/s: (met|NOT MET)", dense[0])
    assert sparse and re.search(rf"{NUMBER} MB/s of data", sparse[0])
    assert re.search(r"sparse/dense: time [0-9.]+x, data sent [0-9.]+x .*: (met|NOT MET)", out)
    assert re.search(
        r"one replica down .* IOPS .*goal >= 0\.90x healthy \([0-9.]+x\): (met|NOT MET)", out
    )
    assert re.search(r"^healthy +" + NUMBER, "\n".join(x.strip() for x in lines), re.M)
    assert any(line.startswith("server logs:") for line in lines), out
