"""The CSI controller dials its backend (the volume server's management API) with mutual TLS:
a real `blockyard serve` that requires client certificates, and real `blockyard csi`
controllers with a good certificate, a certificate from another CA, an unusable file, and
none at all for an address off loopback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from csi_helpers import MIB, Serve, block_cap, launch, launch_csi, rpc_code, run_csi

from blockyard.csi.proto import csi_pb2 as pb
from blockyard.testing.tlscerts import CertFiles, TestCa

#: RFC 6761 §6.4: never resolves, so a broken refusal still reaches no other host.
REMOTE_BACKEND = "volume-server.invalid:7400"


@dataclass(frozen=True)
class TlsStack:
    serve: Serve
    root: Path
    client: CertFiles
    stranger: CertFiles

    def controller_args(self, name: str, files: CertFiles) -> list[str]:
        return [
            "--mode", "controller", "--node-id", "controller-0", "--backend", self.serve.api,
            "--state-dir", str(self.root / f"state-{name}"), *files.flags(),
        ]  # fmt: skip


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    root = tmp_path_factory.mktemp("csi-tls")
    ours, theirs = TestCa("blockyard"), TestCa("stranger")
    server = ours.issue(root / "pki", "server", server=True)
    client = ours.issue(root / "pki", "controller", client=True)
    other = theirs.issue(root / "pki-stranger", "controller", client=True)
    stranger = CertFiles(cert=other.cert, key=other.key, ca=client.ca)
    serve = launch(root / "data", root / "logs", extra_args=tuple(server.flags()))
    if not serve.api:
        serve.stop()
        pytest.fail(f"serve did not start: {serve.stderr()}")
    yield TlsStack(serve, root, client, stranger)
    assert serve.stop() == 0, serve.stderr()


def test_controller_provisions_over_mutual_tls(tls_stack: TlsStack) -> None:
    args = tls_stack.controller_args("good", tls_stack.client)
    csi = launch_csi(tls_stack.root / "good.sock", tls_stack.root / "logs", *args)
    try:
        assert csi.ready, csi.stderr()
        probe = csi.identity.Probe(pb.ProbeRequest(), timeout=30)
        assert probe.HasField("ready") and probe.ready.value
        request = pb.CreateVolumeRequest(
            name="pvc-tls",
            capacity_range=pb.CapacityRange(required_bytes=4 * MIB),
            volume_capabilities=[block_cap()],
        )
        volume = csi.controller.CreateVolume(request, timeout=60).volume
        assert volume.capacity_bytes == 4 * MIB
        csi.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=60)
    finally:
        assert csi.stop() == 0, csi.stderr()


def test_controller_with_a_certificate_from_another_ca_gets_nothing(tls_stack: TlsStack) -> None:
    args = tls_stack.controller_args("stranger", tls_stack.stranger)
    csi = launch_csi(tls_stack.root / "stranger.sock", tls_stack.root / "logs", *args)
    try:
        assert csi.ready, csi.stderr()
        probe = csi.identity.Probe(pb.ProbeRequest(), timeout=30)
        assert probe.HasField("ready") and not probe.ready.value
        request = pb.CreateVolumeRequest(
            name="pvc-stranger",
            capacity_range=pb.CapacityRange(required_bytes=4 * MIB),
            volume_capabilities=[block_cap()],
        )
        code, details = rpc_code(csi.controller.CreateVolume, request)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "the server must trust the CA that signed --tls-cert" in details
    finally:
        assert csi.stop() == 0, csi.stderr()


def test_unusable_tls_file_fails_the_start_in_one_line(tls_stack: TlsStack) -> None:
    missing = tls_stack.root / "missing.crt"
    files = CertFiles(cert=missing, key=tls_stack.client.key, ca=tls_stack.client.ca)
    result = run_csi(tls_stack.root / "bad.sock", *tls_stack.controller_args("bad", files))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"blockyard csi: error: --tls-cert {missing}: no such file; fix --tls-cert, or check "
        "that the file (in Kubernetes: the Secret) is mounted there"
    ]
    assert not (tls_stack.root / "bad.sock").exists()


def test_plaintext_backend_off_loopback_needs_insecure(tmp_path: Path) -> None:
    args = ("--mode", "controller", "--node-id", "n0", "--backend", REMOTE_BACKEND)
    result = run_csi(tmp_path / "csi.sock", *args, "--state-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"blockyard csi: error: refusing to dial {REMOTE_BACKEND} without TLS: it is not a "
        "loopback address, so the requests could be read or answered by anyone on the path; "
        "give --tls-cert, --tls-key and --tls-ca (mutual TLS), or --insecure to accept plaintext"
    ]
    assert not (tmp_path / "csi.sock").exists()
