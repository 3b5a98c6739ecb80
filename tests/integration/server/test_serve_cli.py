"""`blockyard volume ... --server HOST:PORT` goes through the management API."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from serve_helpers import TOOL_TIMEOUT_S, Serve


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockyard.cli.main", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )


def test_volume_verbs_over_the_api(start_serve: Callable[..., Serve]) -> None:
    serve = start_serve()
    at = ("--server", serve.api)
    created = cli("volume", "create", "cli1", "--size", "4MiB", "--json", *at)
    assert created.returncode == 0, created.stderr
    doc = json.loads(created.stdout)
    assert doc["iqn"].endswith(f":cli1.{doc['uuid'].replace('-', '')[:12]}")
    assert doc["size_bytes"] == 4 << 20
    assert cli("volume", "grow", "cli1", "--size", "8MiB", *at).returncode == 0
    assert cli("volume", "snapshot", "create", "cli1", "s1", *at).returncode == 0
    snaps = json.loads(cli("volume", "snapshot", "list", "cli1", "--json", *at).stdout)
    assert [s["name"] for s in snaps] == ["s1"]
    assert cli("volume", "clone", "cli1", "s1", "cli2", *at).returncode == 0
    listed = json.loads(cli("volume", "list", "--json", *at).stdout)
    assert {v["name"]: v["size_bytes"] for v in listed} == {"cli1": 8 << 20, "cli2": 8 << 20}
    info = cli("volume", "info", "cli2", *at)
    assert info.returncode == 0 and "cli2" in info.stdout
    assert cli("volume", "snapshot", "delete", "cli1", "s1", *at).returncode == 0
    assert cli("volume", "delete", "cli2", *at).returncode == 0
    missing = cli("volume", "info", "cli2", *at)
    assert missing.returncode == 1
    assert "no volume 'cli2'" in missing.stderr
    # The direct path still works on the same directory once the server is gone.
    assert serve.stop() == 0
    direct = cli("volume", "list", "--json", "--data-dir", str(serve.data_dir))
    assert [v["name"] for v in json.loads(direct.stdout)] == ["cli1"]


def test_server_and_data_dir_are_exclusive() -> None:
    both = cli("volume", "list", "--server", "127.0.0.1:1", "--data-dir", "/tmp")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    neither = cli("volume", "list")
    assert neither.returncode == 2


def test_unreachable_server_is_a_clear_error() -> None:
    # Port 1 on localhost has no listener; the client gives up within its deadline.
    out = cli("volume", "list", "--server", "127.0.0.1:1")
    assert out.returncode == 1
    assert "127.0.0.1:1" in out.stderr
