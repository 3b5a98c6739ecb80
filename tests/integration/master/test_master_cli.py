"""The CLI through a real master (SQLite) and three real volume servers: `volume create
--master` with --replicas/--durability, `volume get -o json` (the contract's `primary`,
`replicas` with `state`, `epoch`), `volume list`, `volume expand`, `servers -o json`, `status`,
`volume delete` (idempotent), and a clear error when no master answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_master_process import (  # the real-process cluster fixture
    Proc,
    alive_servers,
    cluster,
    wait_for,
)

__all__ = ["cluster"]  # a fixture, used by name

MIB = 1 << 20


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "blockyard.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert done.returncode == 0, f"{args}: rc {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def test_volume_lifecycle_through_the_master_cli(
    cluster: tuple[Proc, list[Proc]], tmp_path: Path
) -> None:
    master, _servers = cluster
    addr = master.fields["master"]
    wait_for("three alive servers", lambda: len(alive_servers(addr)) == 3)

    out = cli("volume", "create", "cv", "--size", "64MiB", "--replicas", "2",
              "--durability", "sync_all", "--master", addr).stdout  # fmt: skip
    assert "created volume cv" in out and "2 copies" in out and "sync_all" in out, out

    def doc() -> dict[str, object]:
        got = json.loads(cli("volume", "get", "cv", "--master", addr, "-o", "json").stdout)
        assert isinstance(got, dict)
        return got

    def both_in_sync() -> bool:
        d = doc()
        replicas = d["replicas"]
        assert isinstance(replicas, list)
        return d["status"] == "active" and [r["state"] for r in replicas] == ["in_sync"]

    wait_for("the replica in sync", both_in_sync)
    d = doc()
    primary, replicas = d["primary"], d["replicas"]
    assert isinstance(primary, dict) and isinstance(replicas, list)
    assert d["epoch"] == 1 and d["durability"] == "sync_all" and d["size_bytes"] == 64 * MIB
    assert primary["role"] == "primary" and replicas[0]["role"] == "replica"
    assert primary["server_id"] != replicas[0]["server_id"]
    assert primary["iscsi_portals"] and str(d["iqn"]).startswith("iqn.")

    listed = cli("volume", "list", "--master", addr).stdout
    assert listed.splitlines()[0].split()[:2] == ["NAME", "SIZE"], listed
    assert any(line.split()[0] == "cv" for line in listed.splitlines()[1:]), listed

    out = cli("volume", "expand", "cv", "--size", "96MiB", "--master", addr).stdout
    assert "96 MiB" in out or "96MiB" in out, out
    assert doc()["size_bytes"] == 96 * MIB

    servers = json.loads(cli("servers", "--master", addr, "-o", "json").stdout)
    assert sorted(s["state"] for s in servers) == ["alive"] * 3
    assert sum(s["primaries"] for s in servers) == 1
    assert sum(s["replicas"] for s in servers) == 1

    status = cli("status", "--master", addr).stdout
    assert "leads" in status and "cv" in status and "PRIMARY" in status, status

    assert "deleted volume cv" in cli("volume", "delete", "cv", "--master", addr).stdout
    assert "nothing to delete" in cli("volume", "delete", "cv", "--master", addr).stdout
    gone = cli("volume", "get", "cv", "--master", addr, check=False)
    assert gone.returncode == 1 and "cv" in gone.stderr, gone


def test_no_master_is_one_clear_line() -> None:
    done = cli("servers", "--master", "127.0.0.1:1", "--timeout", "2", check=False)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "no master answered" in done.stderr, done.stderr


def test_master_tls_flags_are_checked_before_it_starts(tmp_path: Path) -> None:
    """The master dials the volume servers' management APIs with the same flags as every
    other client of that API: an incomplete set is a usage error, and a file that is not a
    certificate stops the start with one line naming the flag."""
    store = f"sqlite:///{tmp_path}/m.db"
    done = cli("master", "--listen", "127.0.0.1:0", "--store", store, "--tls-cert", "x.pem",
               check=False)  # fmt: skip
    assert done.returncode == 2 and "--tls-key" in done.stderr, done.stderr
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    done = cli("master", "--listen", "127.0.0.1:0", "--store", store, "--tls-cert", str(bad),
               "--tls-key", str(bad), "--tls-ca", str(bad), check=False)  # fmt: skip
    assert done.returncode == 1 and "--tls-cert" in done.stderr, done.stderr
