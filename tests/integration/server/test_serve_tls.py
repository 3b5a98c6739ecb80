"""Mutual TLS on the management API, against real `blockyard serve` processes and the real
`blockyard volume` CLI: certificates from a CA made in the test, a client certificate from
another CA, clients without a certificate or without TLS, and the rule that nothing but
loopback is served or dialed in plaintext without --insecure."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from serve_helpers import TOOL_TIMEOUT_S, Serve

from blockyard.server.proto import volume_server_pb2 as pb
from blockyard.server.proto import volume_server_pb2_grpc as pb_grpc
from blockyard.testing.tlscerts import CertFiles, TestCa

EXIT_USAGE = 2
EXIT_ERROR = 1
#: A name that can never resolve (RFC 6761 §6.4): refused before any connection; should the
#: refusal ever break, the dial fails at name resolution and still reaches no other host.
REMOTE_API = "volume-server.invalid:7400"


@dataclass(frozen=True)
class Pki:
    server: CertFiles
    client: CertFiles
    #: A client certificate signed by another CA (trusting our CA for the server's).
    stranger: CertFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ours, theirs = TestCa("blockyard"), TestCa("stranger")
    server = ours.issue(root / "ours", "server", server=True)
    client = ours.issue(root / "ours", "client", client=True)
    other = theirs.issue(root / "theirs", "client", client=True)
    return Pki(server, client, CertFiles(cert=other.cert, key=other.key, ca=client.ca))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blockyard.cli.main", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {lines}"
    return lines[0]


def names(listed: subprocess.CompletedProcess[str]) -> list[str]:
    assert listed.returncode == 0, listed.stderr
    return [v["name"] for v in json.loads(listed.stdout)]


@pytest.fixture
def tls_serve(start_serve: Callable[..., Serve], pki: Pki) -> Serve:
    serve = start_serve(extra_args=tuple(pki.server.flags()))
    assert serve.api, serve.stderr()
    return serve


def test_tls_end_to_end_with_the_cli(tls_serve: Serve, pki: Pki) -> None:
    at = ("--server", tls_serve.api, *pki.client.flags())
    created = cli("volume", "create", "tls1", "--size", "4MiB", "--json", *at)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["size_bytes"] == 4 << 20
    assert names(cli("volume", "list", "--json", *at)) == ["tls1"]
    # The server certificate names localhost too; --tls-server-name checks another name.
    by_name = cli("volume", "list", "--json", *at, "--tls-server-name", "localhost")
    assert names(by_name) == ["tls1"]
    assert "management API: mutual TLS" in tls_serve.stderr()
    assert tls_serve.stop() == 0, tls_serve.stderr()


def test_client_without_a_certificate_is_refused(tls_serve: Serve, pki: Pki) -> None:
    """The CLI cannot even be asked for TLS without a certificate, so a raw gRPC client that
    verifies the server but presents nothing stands in for one."""

    async def health() -> grpc.StatusCode:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.client.ca.read_bytes())
        async with grpc.aio.secure_channel(tls_serve.api, credentials) as channel:
            try:
                await pb_grpc.VolumeServerStub(channel).Health(pb.HealthRequest(), timeout=20)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    assert asyncio.run(health()) == grpc.StatusCode.UNAVAILABLE


def test_client_certificate_from_another_ca_is_refused(tls_serve: Serve, pki: Pki) -> None:
    at = ("--server", tls_serve.api)
    refused = cli("volume", "create", "sneaky", "--size", "4MiB", *at, *pki.stranger.flags())
    assert refused.returncode == EXIT_ERROR
    line = one_line(refused.stderr)
    assert line.startswith(f"blockyard: error: volume server {tls_serve.api}: ")
    assert "the server must trust the CA that signed --tls-cert" in line
    assert names(cli("volume", "list", "--json", *at, *pki.client.flags())) == []
    # gRPC's own handshake lines stay out of the server's log (GRPC_VERBOSITY=ERROR default).
    assert "ssl_transport_security" not in tls_serve.stderr()


def test_plaintext_client_to_a_tls_server_fails_clearly(tls_serve: Serve) -> None:
    plain = cli("volume", "list", "--server", tls_serve.api)
    assert plain.returncode == EXIT_ERROR
    line = one_line(plain.stderr)
    assert line.startswith(f"blockyard: error: volume server {tls_serve.api}: ")
    assert line.endswith("(if that server requires TLS, give --tls-cert, --tls-key and --tls-ca)")


def test_tls_client_to_a_plaintext_server_fails_clearly(
    start_serve: Callable[..., Serve], pki: Pki
) -> None:
    serve = start_serve()
    listed = cli("volume", "list", "--server", serve.api, *pki.client.flags())
    assert listed.returncode == EXIT_ERROR
    line = one_line(listed.stderr)
    assert line.startswith(f"blockyard: error: volume server {serve.api}: ")
    assert "with TLS, the server's certificate must be signed by --tls-ca" in line


def test_server_files_are_checked_before_the_data_directory(
    start_serve: Callable[..., Serve], pki: Pki, tmp_path: Path
) -> None:
    data_dir = tmp_path / "untouched"
    wrong_key = CertFiles(cert=pki.server.cert, key=pki.client.key, ca=pki.server.ca)
    serve = start_serve(data_dir, extra_args=tuple(wrong_key.flags()))
    assert serve.process.wait(timeout=TOOL_TIMEOUT_S) == EXIT_ERROR
    line = one_line(serve.stderr())
    assert line == (
        f"blockyard serve: error: --tls-key {pki.client.key} does not belong to --tls-cert "
        f"{pki.server.cert}; give the key the certificate was issued for"
    )
    assert not data_dir.exists()


def test_non_loopback_listen_without_tls_is_refused_in_one_line(
    start_serve: Callable[..., Serve], tmp_path: Path
) -> None:
    data_dir = tmp_path / "untouched"
    serve = start_serve(data_dir, api_listen="0.0.0.0:0")
    assert serve.process.wait(timeout=TOOL_TIMEOUT_S) == EXIT_USAGE
    line = one_line(serve.stderr())
    assert line == (
        "blockyard serve: error: refusing to serve the management API on 0.0.0.0:0 without "
        "TLS: it is not a loopback address, so anyone who can reach it could call it; give "
        "--tls-cert, --tls-key and --tls-ca (mutual TLS), or --insecure to accept plaintext"
    )
    assert not data_dir.exists(), "refused before the data directory was touched"


def test_non_loopback_listen_with_insecure_starts_and_warns(
    start_serve: Callable[..., Serve],
) -> None:
    serve = start_serve(api_listen="0.0.0.0:0", extra_args=("--insecure",))
    assert serve.api.startswith("0.0.0.0:"), serve.stderr()
    warnings = [line for line in serve.stderr().splitlines() if " WARNING " in line]
    assert len(warnings) == 1, serve.stderr()
    assert "serving the management API on 0.0.0.0:0 without TLS (--insecure)" in warnings[0]
    port = serve.api.rpartition(":")[2]
    assert names(cli("volume", "list", "--json", "--server", f"127.0.0.1:{port}")) == []
    assert serve.stop() == 0, serve.stderr()


def test_tls_flags_that_cannot_work_are_usage_errors(pki: Pki, tmp_path: Path) -> None:
    half = cli(
        "serve", "--data-dir", str(tmp_path / "d"), "--iscsi-listen", "127.0.0.1:0",
        "--api-listen", "127.0.0.1:0", "--tls-cert", str(pki.server.cert),
    )  # fmt: skip
    assert half.returncode == EXIT_USAGE
    assert one_line(half.stderr) == (
        "blockyard serve: error: --tls-cert given without --tls-key, --tls-ca: --tls-cert, "
        "--tls-key and --tls-ca go together"
    )
    both = cli("volume", "list", "--server", "127.0.0.1:1", *pki.client.flags(), "--insecure")
    assert both.returncode == EXIT_USAGE
    assert "--insecure contradicts" in one_line(both.stderr)
    local = cli("volume", "list", "--data-dir", str(tmp_path), *pki.client.flags())
    assert local.returncode == EXIT_USAGE
    assert "go with --server, not --data-dir" in one_line(local.stderr)


def test_clients_refuse_plaintext_off_loopback_without_insecure() -> None:
    refused = cli("volume", "list", "--server", REMOTE_API)
    assert refused.returncode == EXIT_USAGE
    assert one_line(refused.stderr) == (
        f"blockyard: error: refusing to dial {REMOTE_API} without TLS: it is not a loopback "
        "address, so the requests could be read or answered by anyone on the path; give "
        "--tls-cert, --tls-key and --tls-ca (mutual TLS), or --insecure to accept plaintext"
    )
    attach = cli("attach", "vol", "--server", REMOTE_API)
    assert attach.returncode == EXIT_USAGE
    assert f"refusing to dial {REMOTE_API} without TLS" in one_line(attach.stderr)
