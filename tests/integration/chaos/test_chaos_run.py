"""``blockyard chaos`` end to end (issue 9 §CI): the real command, its own cluster (a master,
three ``blockyard serve`` in network namespaces, replication through fault proxies, the
userspace initiator), a seeded schedule of faults, and the checker.

- ``test_chaos_seed``: three seeds x 90 s of every fault (kill -9, pause, partition, master
  kill, delay, kill with a lagging replica, a server cut from the master); every check must
  hold. Seeds 101 and 202 run one master on SQLite; seed 303 a group of three masters on etcd,
  where the master fault kills the leader. A failure prints the command that re-runs it;
  ``BLOCKYARD_CHAOS_SEEDS`` overrides the seeds (then all with one master).
- ``test_checker_catches_a_broken_cluster``: the self-test. The cluster is started with one
  deliberate defect (``--sabotage``) and the run must fail, on the check that defect breaks.

Partitions need network namespaces (root): where they cannot be made the report says the
partition fault was not run, and the test counts that as a failure, not a pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: (seed, masters): the last run has a master group on etcd.
RUNS = (
    [(int(s), 1) for s in os.environ["BLOCKYARD_CHAOS_SEEDS"].split(",")]
    if os.environ.get("BLOCKYARD_CHAOS_SEEDS")
    else [(101, 1), (202, 1), (303, 3)]
)
FAULTS = "kill,pause,partition,master,delay,kill-lagging,master-partition"
#: 90 s of faults, plus setup, the heal wait of the last fault and the final read-back.
RUN_TIMEOUT_S = 420


def _chaos(tmp_path: Path, *args: str) -> tuple[int, dict[str, object], str]:
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "blockyard.cli.main", "chaos", "--dir", str(tmp_path / "run"),
           "--report", str(report), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    print(proc.stdout)
    print(proc.stderr[-4000:], file=sys.stderr)
    assert report.exists(), f"no report (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return proc.returncode, json.loads(report.read_text()), proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize(("seed", "masters"), RUNS)
def test_chaos_seed(tmp_path: Path, seed: int, masters: int) -> None:
    args = ["--seed", str(seed), "--duration", "90s", "--faults", FAULTS, "--masters", str(masters)]
    code, report, out = _chaos(tmp_path, *args)
    assert report["masters"] == ("1 on SQLite" if masters == 1 else f"{masters} on etcd")
    not_run = report["faults_not_run"]
    assert not_run == {}, f"seed {seed}: faults not run: {not_run}"
    results = report["results"]
    assert isinstance(results, list)
    assert len(results) >= 5, f"seed {seed}: only {len(results)} faults in 90 s"
    checks = report["checks"]
    assert isinstance(checks, dict)
    failed = {n: c for n, c in checks.items() if c}
    assert code == 0 and not failed and not report["harness_errors"], (
        f"seed {seed} (re-run: blockyard chaos {' '.join(args)}): "
        f"failed checks {failed}; {report['harness_errors']}; see the output above"
    )
    assert isinstance(report["durable_writes"], int) and report["durable_writes"] > 1000
    assert "PASS" in out


#: defect → (arguments that give it a chance to show, checks of which one must fail)
SABOTAGE = {
    # Lost data on a replica: the final comparison of the copies, or a read after the replica
    # was promoted.
    "replica-drops-records": (["--faults", "kill", "--duration", "30s"], {"1", "7"}),
    # Acknowledged before the replica holds it: lost when the primary dies while a replica lags.
    "ack-before-barrier": (
        ["--faults", "kill-lagging", "--layout", "sync_all", "--duration", "30s"],
        {"1"},
    ),
    # A failover in the same epoch: the old primary is not fenced (two primaries in one epoch)
    # and the volume does not heal.
    "lose-epoch-bump": (
        ["--faults", "pause", "--layout", "sync_all", "--duration", "30s", "--heal-bound", "30s"],
        {"1", "4", "5"},
    ),
}


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("defect", sorted(SABOTAGE))
def test_checker_catches_a_broken_cluster(tmp_path: Path, defect: str) -> None:
    args, expected = SABOTAGE[defect]
    code, report, out = _chaos(tmp_path, "--seed", "7", "--sabotage", defect, *args)
    checks = report["checks"]
    assert isinstance(checks, dict)
    failed = {n for n, c in checks.items() if c}
    assert code == 1, f"{defect}: the run passed (exit {code}) though the cluster was broken"
    assert failed & expected, f"{defect}: failed checks {failed}, expected one of {expected}"
    assert report["sabotage"] == [defect]
    assert "FAIL" in out
