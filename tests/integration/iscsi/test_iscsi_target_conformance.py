"""libiscsi's conformance suite (iscsi-test-cu -t ALL --dataloss) against a served 1 GiB
volume, compared with tgtd on a same-size backing file in the same run.

The per-test list with a reason for each failure and skip lives in docs/conformance.md.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from iscsi_proc import need_tools, run, start_server, stop_server

#: Measured 228 of 230 with libiscsi 1.19.0 (tgtd 1.0.85: 222); see docs/conformance.md.
MIN_PASSED = 228
SUITE_TIMEOUT_S = 1200
TGTD_CONTROL_PORT = "23"  # tgtd -C: picks its management socket; 0 is the system daemon's
_SUMMARY = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", re.M)
_TEST = re.compile(r"^Suite: (?P<suite>.+)$|^  Test: (?P<test>\S+) \.\.\.", re.M)


def parse_results(output: str) -> dict[str, str]:
    """Per-test status from CUnit's console output: passed, FAILED or SKIPPED."""
    results: dict[str, str] = {}
    suite = ""
    matches = list(_TEST.finditer(output))
    for i, m in enumerate(matches):
        if m.group("suite"):
            suite = m.group("suite").strip()
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(output)
        body = output[m.end() : end]
        name = f"{suite}.{m.group('test')}"
        if re.search(r"^FAILED$|\.\.\.FAILED|^\s+\d+\. \S+:\d+ +- ", body, re.M) or body.startswith(
            "FAILED"
        ):
            results[name] = "FAILED"
        elif "[SKIPPED]" in body:
            results[name] = "SKIPPED"
        else:
            results[name] = "passed"
    return results


def run_suite(url: str) -> tuple[int, int, int, dict[str, str]]:
    proc = run("iscsi-test-cu", "-t", "ALL", "--dataloss", url, timeout_s=SUITE_TIMEOUT_S)
    summary = _SUMMARY.search(proc.stdout)
    assert summary is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    _total, ran, passed, failed = (int(g) for g in summary.groups())
    return ran, passed, failed, parse_results(proc.stdout)


@pytest.fixture
def tgtd_url(tmp_path: Path) -> Iterator[str | None]:
    """tgtd serving a sparse 1 GiB file on another port, or None when it cannot run here."""
    if shutil.which("tgtd") is None or shutil.which("tgtadm") is None or os.geteuid() != 0:
        yield None
        return
    backing = tmp_path / "tgt.img"
    with backing.open("wb") as f:
        f.truncate(1 << 30)
    port = 3299
    proc = subprocess.Popen(
        ["tgtd", "-f", "-C", TGTD_CONTROL_PORT, "--iscsi", f"portal=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    iqn = "iqn.2026-11.io.tgt:conformance"
    tgtadm = ["tgtadm", "-C", TGTD_CONTROL_PORT, "--lld", "iscsi"]
    try:
        for _ in range(50):
            if run(*tgtadm, "--op", "show", "--mode", "target").returncode == 0:
                break
            time.sleep(0.1)
        steps = [
            ["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn],
            [
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                "1",
                "-b",
                str(backing),
            ],
            ["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"],
        ]
        for step in steps:
            done = run(*tgtadm, *step)
            assert done.returncode == 0, done.stderr
        yield f"iscsi://127.0.0.1:{port}/{iqn}/1"  # tgtd puts its controller at LUN 0
    finally:
        # tgtd ignores SIGTERM while it has targets configured; nothing of it needs to survive.
        proc.kill()
        proc.wait(timeout=15)


@pytest.mark.slow
def test_iscsi_test_cu_all(tmp_path: Path, tgtd_url: str | None) -> None:
    need_tools("iscsi-test-cu")
    served = start_server(tmp_path / "data", "conformance:1G")
    try:
        ran, passed, failed, results = run_suite(served.url)
    finally:
        stop_server(served)
    failures = sorted(name for name, status in results.items() if status == "FAILED")
    assert passed >= MIN_PASSED, f"{passed}/{ran} passed; failed: {failures}"
    assert ran == passed + failed
    if tgtd_url is not None:
        _tgt_ran, tgt_passed, _tgt_failed, _ = run_suite(tgtd_url)
        assert passed > tgt_passed, f"blockyard {passed} vs tgtd {tgt_passed}"
