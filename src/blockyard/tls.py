"""Mutual TLS for blockyard's gRPC APIs: flags, the loopback rule, and gRPC credentials.

Every process that serves or dials a blockyard gRPC API over TCP (the volume server's
management API, the master's API, and their clients) takes the same flags:

``--tls-cert PEM --tls-key PEM --tls-ca PEM``
    This process's certificate chain and private key, and the CA that must have signed the
    peer's certificate. A server requires a client certificate signed by ``--tls-ca``
    (``require_client_auth``); a client checks that the server's certificate is signed by
    ``--tls-ca`` and names the host it dialed (or ``--tls-server-name``).
``--insecure``
    Accept plaintext off loopback. Without TLS, a server refuses to listen and a client
    refuses to dial anything but a loopback address (127.0.0.0/8, ::1, ``localhost``) or a
    unix socket unless this is given; with it, the process logs one warning line and goes on.

Clients follow the same rule as servers, rather than trying TLS and falling back: a plaintext
client off loopback sends every request (CHAP secrets included) in the clear to whoever
answers at that address, and a silent fallback would let an attacker downgrade a TLS client.

Files are read and checked once, when the server starts or the client is made: a missing or
unreadable file, a file that is not PEM, or a key that does not belong to its certificate is a
:class:`~blockyard.errors.TlsFileError` naming the flag and the file. Rotating certificates
takes a restart of the process.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import grpc

from blockyard.errors import TlsConfigError, TlsFileError

log = logging.getLogger("blockyard.tls")

#: A PEM file bigger than this is not a certificate chain or a key (a bound on what we read).
MAX_PEM_BYTES: Final = 1 << 20
#: gRPC channel option: the name the server's certificate must carry, instead of the dialed host.
_TARGET_NAME_OVERRIDE: Final = "grpc.ssl_target_name_override"
#: OpenSSL's reason code when a private key does not belong to the certificate.
_KEY_MISMATCH_REASON: Final = "KEY_VALUES_MISMATCH"
TLS_FLAGS: Final = "--tls-cert, --tls-key and --tls-ca"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of one party: its certificate chain, its private key, the CA it trusts."""

    cert_path: str
    key_path: str
    ca_path: str


@dataclass(frozen=True, slots=True)
class TransportSecurity:
    """How one gRPC endpoint is protected: mutual TLS with ``tls``, or plaintext, which off
    loopback needs ``insecure``. ``server_name`` (clients only) is the name the server's
    certificate must carry when it differs from the dialed host."""

    tls: TlsFiles | None = None
    insecure: bool = False
    server_name: str | None = None

    def describe(self) -> str:
        return "mutual TLS" if self.tls is not None else "plaintext"


#: Plaintext, loopback only: the default of every server and client.
PLAINTEXT: Final = TransportSecurity()


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The checked contents of :class:`TlsFiles`."""

    cert_chain: bytes
    private_key: bytes
    root_certificates: bytes


# ---- command line ----------------------------------------------------------------------------


def add_arguments(
    parser: argparse.ArgumentParser, *, role: Literal["serve", "dial", "both"]
) -> None:
    """Add the TLS flags to a verb that serves (``role="serve"``) or dials a gRPC API, or
    both with one certificate (``role="both"``: the master serves its API and dials the
    volume servers'; the volume server serves its API and dials the master). A certificate
    used both ways needs both extended key usages, serverAuth and clientAuth."""
    group = parser.add_argument_group(
        "mutual TLS",
        "required off loopback unless --insecure; the three files go together",
    )
    me, peer = {
        "serve": ("server", "client"),
        "dial": ("client", "server"),
        "both": ("process (server and client)", "peer"),
    }[role]
    group.add_argument("--tls-cert", metavar="PEM", help=f"this {me}'s certificate (chain)")
    group.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-ca", metavar="PEM", help=f"CA certificate(s) that must have signed the {peer}'s"
    )
    if role != "serve":
        group.add_argument(
            "--tls-server-name",
            metavar="NAME",
            help="name the dialed servers' certificates must carry (default: the host dialed)",
        )
    action = {"serve": "listen", "dial": "dial", "both": "listen on or dial"}[role]
    group.add_argument(
        "--insecure",
        action="store_true",
        help=f"allow plaintext: {action} on a non-loopback address without TLS (a warning)",
    )


def from_args(args: argparse.Namespace) -> TransportSecurity:
    """The :class:`TransportSecurity` the flags ask for; :class:`TlsConfigError` when they
    cannot work together. Reads no file (see :func:`load`)."""
    given = {
        "--tls-cert": getattr(args, "tls_cert", None),
        "--tls-key": getattr(args, "tls_key", None),
        "--tls-ca": getattr(args, "tls_ca", None),
    }
    server_name = getattr(args, "tls_server_name", None) or None
    insecure = bool(getattr(args, "insecure", False))
    present = [flag for flag, value in given.items() if value]
    if not present:
        if server_name is not None:
            raise TlsConfigError(
                f"--tls-server-name needs TLS: give {TLS_FLAGS} too, or drop --tls-server-name"
            )
        return TransportSecurity(insecure=insecure)
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise TlsConfigError(
            f"{', '.join(present)} given without {', '.join(missing)}: {TLS_FLAGS} go together"
        )
    if insecure:
        raise TlsConfigError(
            f"--insecure contradicts {', '.join(present)}: drop --insecure to use TLS, or the "
            "--tls-* flags for plaintext"
        )
    files = TlsFiles(str(args.tls_cert), str(args.tls_key), str(args.tls_ca))
    return TransportSecurity(tls=files, server_name=server_name)


# ---- the loopback rule -----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``. Other names count as remote:
    resolving them here would not bind what gRPC resolves later."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def target_host(target: str) -> str | None:
    """The host of a gRPC target (``HOST:PORT``, ``[V6]:PORT``, ``dns:///HOST:PORT``,
    ``ipv4:ADDR:PORT``), or None for a unix socket."""
    if target.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        return target[1:].partition("]")[0]
    host, sep, port = target.rpartition(":")
    if not sep or ":" in host or not port.isdigit():
        return target  # no port, or a bare IPv6 address
    return host


def check_listen(address: str, host: str, security: TransportSecurity, *, api: str) -> None:
    """Refuse (TlsConfigError) to serve ``api`` in plaintext off loopback without --insecure;
    with it, log one warning line."""
    if security.tls is not None or is_loopback(host):
        return
    if not security.insecure:
        raise TlsConfigError(
            f"refusing to serve {api} on {address} without TLS: it is not a loopback address, "
            f"so anyone who can reach it could call it; give {TLS_FLAGS} (mutual TLS), or "
            "--insecure to accept plaintext"
        )
    log.warning(
        "serving %s on %s without TLS (--insecure): anyone who can reach that address can call "
        "it; give %s to require client certificates",
        api,
        address,
        TLS_FLAGS,
    )


def _plaintext_off_loopback(target: str, security: TransportSecurity) -> bool:
    host = target_host(target)
    return security.tls is None and host is not None and not is_loopback(host)


def check_dial(target: str, security: TransportSecurity) -> None:
    """Refuse (TlsConfigError) to dial ``target`` in plaintext off loopback without
    --insecure. Logs nothing, so configuration checks may call it; :func:`open_channel`
    calls it again and warns about --insecure."""
    if _plaintext_off_loopback(target, security) and not security.insecure:
        raise TlsConfigError(
            f"refusing to dial {target} without TLS: it is not a loopback address, so the "
            f"requests could be read or answered by anyone on the path; give {TLS_FLAGS} "
            "(mutual TLS), or --insecure to accept plaintext"
        )


def transport_hint(security: TransportSecurity, host: str) -> str:
    """What to check when a connection fails, for error messages."""
    if security.tls is None:
        return f"if that server requires TLS, give {TLS_FLAGS}"
    name = security.server_name or host
    return (
        f"with TLS, the server's certificate must be signed by --tls-ca and name {name}, and "
        "the server must trust the CA that signed --tls-cert"
    )


# ---- files -----------------------------------------------------------------------------------


def _read(path: str, flag: str, what: str) -> bytes:
    fix = f"fix {flag}, or check that the file (in Kubernetes: the Secret) is mounted there"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError as exc:
        raise TlsFileError(f"{flag} {path}: no such file; {fix}") from exc
    except IsADirectoryError as exc:
        raise TlsFileError(f"{flag} {path} is a directory; give the {what} file") from exc
    except PermissionError as exc:
        raise TlsFileError(
            f"{flag} {path}: permission denied; let this process's user read the {what}"
        ) from exc
    except OSError as exc:
        raise TlsFileError(f"{flag} {path}: cannot read it ({exc.strerror or exc}); {fix}") from exc
    if len(data) > MAX_PEM_BYTES:
        raise TlsFileError(
            f"{flag} {path} is larger than {MAX_PEM_BYTES} bytes, too big for a PEM {what}"
        )
    if not data.strip():
        raise TlsFileError(f"{flag} {path} is empty; give the PEM {what}")
    return data


def _check_certificates(data: bytes, path: str, flag: str, what: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise TlsFileError(
            f"{flag} {path} holds no PEM {what} (-----BEGIN CERTIFICATE-----); give the "
            "certificate file, not a key or a DER file"
        ) from exc


def _check_key_matches(files: TlsFiles) -> None:
    encrypted = False

    def no_password() -> bytes:
        nonlocal encrypted
        encrypted = True
        return b""

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert_path, files.key_path, password=no_password)
    except ssl.SSLError as exc:
        if encrypted:
            message = (
                f"--tls-key {files.key_path} is encrypted; give an unencrypted PEM key "
                "(protect it with file permissions)"
            )
        elif exc.reason == _KEY_MISMATCH_REASON:
            message = (
                f"--tls-key {files.key_path} does not belong to --tls-cert {files.cert_path}; "
                "give the key the certificate was issued for"
            )
        else:
            message = f"--tls-key {files.key_path} holds no PEM private key; give the key file"
        raise TlsFileError(message) from exc
    except OSError as exc:  # the files changed under us since they were read
        raise TlsFileError(
            f"cannot load --tls-cert {files.cert_path} with --tls-key {files.key_path}: {exc}"
        ) from exc


def load(files: TlsFiles) -> TlsMaterial:
    """Read and check the three files; :class:`TlsFileError` names the flag and the file."""
    cert = _read(files.cert_path, "--tls-cert", "certificate")
    key = _read(files.key_path, "--tls-key", "private key")
    ca = _read(files.ca_path, "--tls-ca", "CA certificate")
    _check_certificates(cert, files.cert_path, "--tls-cert", "certificate")
    _check_certificates(ca, files.ca_path, "--tls-ca", "CA certificate")
    _check_key_matches(files)
    return TlsMaterial(cert_chain=cert, private_key=key, root_certificates=ca)


# ---- gRPC ------------------------------------------------------------------------------------


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that present our certificate and require a client certificate signed by
    the CA (mutual TLS)."""
    material = load(files)
    return grpc.ssl_server_credentials(
        [(material.private_key, material.cert_chain)],
        root_certificates=material.root_certificates,
        require_client_auth=True,
    )


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Add a listening port; returns the bound port (0 or RuntimeError when gRPC cannot bind)."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def open_channel(
    target: str,
    security: TransportSecurity,
    options: Sequence[tuple[str, str | int]] = (),
) -> grpc.aio.Channel:
    """A channel to ``target`` under ``security``, after :func:`check_dial`. Raises
    TlsConfigError (plaintext off loopback) or TlsFileError (files unusable)."""
    check_dial(target, security)
    opts = list(options)
    if security.tls is None:
        if _plaintext_off_loopback(target, security):
            log.warning(
                "dialing %s without TLS (--insecure): requests and answers cross the network "
                "in the clear; give %s to use mutual TLS",
                target,
                TLS_FLAGS,
            )
        return grpc.aio.insecure_channel(target, options=opts)
    material = load(security.tls)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=material.root_certificates,
        private_key=material.private_key,
        certificate_chain=material.cert_chain,
    )
    if security.server_name:
        opts.append((_TARGET_NAME_OVERRIDE, security.server_name))
    return grpc.aio.secure_channel(target, credentials, options=opts)
