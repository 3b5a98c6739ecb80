"""Mutual TLS on the master's API, with a real ``blockyard master``, real ``blockyard serve
--master`` volume servers and the real CLI: the servers heartbeat over TLS with their own
certificate, the master dials their management APIs with its certificate, the CLI creates a
2-copy volume and both copies take their roles; a client without a certificate, with one from
another CA, or in plaintext is refused; plaintext off loopback without --insecure is a usage
error for the master and for a volume server dialing a master."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_master_cli import cli as master_cli
from test_master_process import Proc, launch, wait_for

from blockyard.testing.tlscerts import CertFiles, TestCa

EXIT_USAGE = 2
EXIT_ERROR = 1
INTERVAL = "200ms"
#: TEST-NET-1 (RFC 5737): never a local or routable address; the refusals come before any
#: socket is opened, and should they ever break, nothing answers there.
REMOTE_HOST = "192.0.2.1"


@dataclass(frozen=True)
class Pki:
    master: CertFiles
    server: CertFiles
    admin: CertFiles
    #: Signed by another CA (trusting ours for the master's certificate).
    stranger: CertFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ours, theirs = TestCa("blockyard"), TestCa("stranger")
    # The master and the servers serve and dial with one certificate: both key usages.
    master = ours.issue(root / "ours", "master", server=True, client=True)
    server = ours.issue(root / "ours", "server", server=True, client=True)
    admin = ours.issue(root / "ours", "admin", client=True)
    other = theirs.issue(root / "theirs", "admin", client=True)
    return Pki(master, server, admin, CertFiles(cert=other.cert, key=other.key, ca=admin.ca))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return master_cli(*args, check=False)


@pytest.fixture
def tls_cluster(tmp_path: Path, pki: Pki) -> Iterator[tuple[Proc, list[Proc]]]:
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[Proc] = []
    try:
        master = launch(
            ["master", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/m.db",
             "--heartbeat-interval", INTERVAL, *pki.master.flags()],
            logs / "master.log",
        )  # fmt: skip
        procs.append(master)
        assert master.fields, master.log.read_text()
        for i in range(2):
            s = launch(
                ["serve", "--data-dir", str(tmp_path / f"s{i}"), "--api-listen", "127.0.0.1:0",
                 "--iscsi-listen", "127.0.0.1:0", "--replication-listen", "127.0.0.1:0",
                 "--master", master.fields["master"], "--heartbeat-interval", INTERVAL,
                 *pki.server.flags()],
                logs / f"serve-{i}.log",
            )  # fmt: skip
            procs.append(s)
            assert s.fields, s.log.read_text()
        yield master, procs[1:]
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGKILL)


def test_master_api_with_mutual_tls_end_to_end(
    tls_cluster: tuple[Proc, list[Proc]], pki: Pki
) -> None:
    master, _servers = tls_cluster
    at = ("--master", master.fields["master"], *pki.admin.flags())

    def alive() -> int:
        listed = cli("servers", *at, "-o", "json")
        assert listed.returncode == 0, listed.stderr
        return sum(s["state"] == "alive" for s in json.loads(listed.stdout))

    # The servers' heartbeat streams are TLS streams with their certificate.
    wait_for("both servers alive over TLS", lambda: alive() == 2)
    created = cli("volume", "create", "tv", "--size", "16MiB", "--replicas", "2",
                  "--durability", "sync_all", *at)  # fmt: skip
    assert created.returncode == 0, created.stderr

    def doc() -> dict[str, object]:
        got = cli("volume", "get", "tv", *at, "-o", "json")
        assert got.returncode == 0, got.stderr
        d = json.loads(got.stdout)
        assert isinstance(d, dict)
        return d

    def in_sync() -> bool:
        # The master dialed both servers' management APIs (TLS) to place and assign the copies.
        d = doc()
        replicas = d["replicas"]
        assert isinstance(replicas, list)
        return d["primary"] is not None and [r["state"] for r in replicas] == ["in_sync"]

    wait_for("the 2-copy volume in sync", in_sync)
    assert doc()["epoch"] == 1

    # No certificate: plaintext to a TLS master fails, with a hint about TLS.
    # (A refused handshake looks like an unreachable master to gRPC, which the client retries
    # until its deadline: a short one keeps the test short.)
    quick = ("--timeout", "3")
    plain = cli("servers", "--master", master.fields["master"], *quick)
    assert plain.returncode == EXIT_ERROR, plain.stdout
    assert "--tls-cert" in plain.stderr, plain.stderr
    # A certificate another CA signed is refused at the handshake.
    stranger = cli("servers", "--master", master.fields["master"], *quick,
                   *pki.stranger.flags())  # fmt: skip
    assert stranger.returncode == EXIT_ERROR, stranger.stdout
    assert "alive" not in stranger.stdout
    # The master's certificate is checked too: a CA that did not sign it is refused.
    wrong_ca = CertFiles(cert=pki.admin.cert, key=pki.admin.key, ca=pki.stranger.cert)
    other = cli("servers", "--master", master.fields["master"], *quick, *wrong_ca.flags())
    assert other.returncode == EXIT_ERROR, other.stdout


def test_plaintext_off_loopback_is_a_usage_error(tmp_path: Path) -> None:
    master = cli("master", "--listen", f"{REMOTE_HOST}:9333", "--store",
                 f"sqlite:///{tmp_path}/m.db")  # fmt: skip
    assert master.returncode == EXIT_USAGE, master.stderr
    assert "refusing to serve the master API" in master.stderr
    assert "--insecure" in master.stderr
    assert not (tmp_path / "m.db").exists(), "the store was opened before the refusal"

    serve = cli("serve", "--data-dir", str(tmp_path / "s"), "--api-listen", "127.0.0.1:0",
                "--iscsi-listen", "127.0.0.1:0", "--master", f"{REMOTE_HOST}:9333")  # fmt: skip
    assert serve.returncode == EXIT_USAGE, serve.stderr
    assert f"refusing to dial {REMOTE_HOST}:9333 without TLS" in serve.stderr
