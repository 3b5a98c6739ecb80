"""blockyard.tls: the flags, the loopback rule, and the checks on certificate files. The gRPC
handshakes themselves are tested end to end against real processes in
tests/integration/server/test_serve_tls.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import pytest

from blockyard import tls
from blockyard.errors import TlsConfigError, TlsFileError
from blockyard.testing.tlscerts import CertFiles, TestCa


@pytest.fixture(scope="module")
def ca() -> TestCa:
    return TestCa("unit")


@pytest.fixture
def files(ca: TestCa, tmp_path: Path) -> CertFiles:
    return ca.issue(tmp_path, "server", server=True)


def parse(role: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    tls.add_arguments(parser, role=role)  # type: ignore[arg-type]
    return parser.parse_args(list(argv))


def as_files(c: CertFiles) -> tls.TlsFiles:
    return tls.TlsFiles(str(c.cert), str(c.key), str(c.ca))


# ---- flags ---------------------------------------------------------------------------------


def test_no_flags_is_plaintext() -> None:
    assert tls.from_args(parse("serve")) == tls.PLAINTEXT
    assert tls.from_args(parse("dial", "--insecure")) == tls.TransportSecurity(insecure=True)


def test_all_three_files_make_tls(files: CertFiles) -> None:
    security = tls.from_args(parse("dial", *files.flags(), "--tls-server-name", "api.example"))
    assert security.tls == as_files(files)
    assert security.server_name == "api.example"
    assert not security.insecure


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--tls-cert", "c.pem"), "--tls-cert given without --tls-key, --tls-ca"),
        (("--tls-cert", "c", "--tls-key", "k"), "given without --tls-ca"),
        (("--tls-ca", "ca"), "--tls-ca given without --tls-cert, --tls-key"),
        (("--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a", "--insecure"), "contradicts"),
        (("--tls-server-name", "x"), "--tls-server-name needs TLS"),
    ],
)
def test_flag_sets_that_cannot_work(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(TlsConfigError, match=message) as info:
        tls.from_args(parse("dial", *argv))
    assert "\n" not in str(info.value)


def test_servers_have_no_server_name_flag() -> None:
    with pytest.raises(SystemExit):
        parse("serve", "--tls-server-name", "x")


# ---- the loopback rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.7", False),
        ("::ffff:10.0.0.7", False),
        ("localhost.example", False),
        ("blockyard-api.blockyard-system.svc", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert tls.is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("127.0.0.1:7400", "127.0.0.1"),
        ("[::1]:7400", "::1"),
        ("dns:///api.example:7400", "api.example"),
        ("ipv4:10.0.0.7:7400", "10.0.0.7"),
        ("api.example", "api.example"),
        ("unix:///run/api.sock", None),
    ],
)
def test_target_host(target: str, host: str | None) -> None:
    assert tls.target_host(target) == host


def test_listen_off_loopback_needs_tls_or_insecure(
    files: CertFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="blockyard.tls")
    with pytest.raises(TlsConfigError, match=r"refusing to serve the API on 0\.0\.0\.0:7400"):
        tls.check_listen("0.0.0.0:7400", "0.0.0.0", tls.PLAINTEXT, api="the API")
    tls.check_listen("127.0.0.1:7400", "127.0.0.1", tls.PLAINTEXT, api="the API")
    tls.check_listen("0.0.0.0:7400", "0.0.0.0", tls.TransportSecurity(as_files(files)), api="x")
    assert caplog.records == []
    tls.check_listen("0.0.0.0:7400", "0.0.0.0", tls.TransportSecurity(insecure=True), api="x")
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "without TLS (--insecure)" in caplog.records[0].getMessage()


def test_dial_off_loopback_needs_tls_or_insecure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="blockyard.tls")
    with pytest.raises(TlsConfigError, match=r"refusing to dial 192\.0\.2\.1:7400 without TLS"):
        tls.check_dial("192.0.2.1:7400", tls.PLAINTEXT)
    tls.check_dial("localhost:7400", tls.PLAINTEXT)
    tls.check_dial("unix:///run/x.sock", tls.PLAINTEXT)
    tls.check_dial("192.0.2.1:7400", tls.TransportSecurity(insecure=True))
    assert caplog.records == [], "check_dial is silent: configuration checks call it"

    async def open_and_close() -> None:
        # A channel connects only when used: nothing is sent to the documentation address.
        channel = tls.open_channel("192.0.2.1:7400", tls.TransportSecurity(insecure=True))
        await channel.close()

    asyncio.run(open_and_close())
    assert len(caplog.records) == 1
    assert "dialing 192.0.2.1:7400 without TLS (--insecure)" in caplog.records[0].getMessage()


# ---- files ---------------------------------------------------------------------------------


def test_good_files_load(files: CertFiles) -> None:
    material = tls.load(as_files(files))
    assert material.cert_chain == files.cert.read_bytes()
    assert material.private_key == files.key.read_bytes()
    assert material.root_certificates == files.ca.read_bytes()


def load_error(files: tls.TlsFiles) -> str:
    with pytest.raises(TlsFileError) as info:
        tls.load(files)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_names_flag_and_path(files: CertFiles, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.crt")
    message = load_error(tls.TlsFiles(missing, str(files.key), str(files.ca)))
    assert message.startswith(f"--tls-cert {missing}: no such file")
    message = load_error(tls.TlsFiles(str(files.cert), str(files.key), missing))
    assert message.startswith(f"--tls-ca {missing}: no such file")


def test_directory_and_empty_file(files: CertFiles, tmp_path: Path) -> None:
    message = load_error(tls.TlsFiles(str(files.cert), str(tmp_path), str(files.ca)))
    assert message == f"--tls-key {tmp_path} is a directory; give the private key file"
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"\n")
    message = load_error(tls.TlsFiles(str(files.cert), str(files.key), str(empty)))
    assert message == f"--tls-ca {empty} is empty; give the PEM CA certificate"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(files: CertFiles) -> None:
    files.key.chmod(0)
    message = load_error(as_files(files))
    assert message.startswith(f"--tls-key {files.key}: permission denied")


def test_oversized_file_is_not_read_whole(files: CertFiles, tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (tls.MAX_PEM_BYTES + 1))
    message = load_error(tls.TlsFiles(str(big), str(files.key), str(files.ca)))
    assert "larger than" in message


def test_wrong_kind_of_file(files: CertFiles) -> None:
    # The key given as the certificate, the certificate given as the key, a key as the CA.
    message = load_error(tls.TlsFiles(str(files.key), str(files.key), str(files.ca)))
    assert message.startswith(f"--tls-cert {files.key} holds no PEM certificate")
    message = load_error(tls.TlsFiles(str(files.cert), str(files.cert), str(files.ca)))
    assert message == f"--tls-key {files.cert} holds no PEM private key; give the key file"
    message = load_error(tls.TlsFiles(str(files.cert), str(files.key), str(files.key)))
    assert message.startswith(f"--tls-ca {files.key} holds no PEM CA certificate")


def test_key_of_another_certificate(ca: TestCa, files: CertFiles, tmp_path: Path) -> None:
    other = ca.issue(tmp_path / "other", "other", client=True)
    message = load_error(tls.TlsFiles(str(files.cert), str(other.key), str(files.ca)))
    assert message == (
        f"--tls-key {other.key} does not belong to --tls-cert {files.cert}; give the key the "
        "certificate was issued for"
    )


def test_encrypted_key_is_refused_without_prompting(files: CertFiles, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    message = load_error(tls.TlsFiles(str(files.cert), str(encrypted), str(files.ca)))
    assert message.startswith(f"--tls-key {encrypted} is encrypted")


def test_server_credentials_load_the_files(files: CertFiles, tmp_path: Path) -> None:
    assert tls.server_credentials(as_files(files)) is not None
    with pytest.raises(TlsFileError):
        tls.server_credentials(tls.TlsFiles(str(tmp_path / "x"), str(files.key), str(files.ca)))
