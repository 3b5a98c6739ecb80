"""The CSI plugin process: Identity plus the Controller and/or Node service on a unix socket.

Modes: ``controller`` (Identity + Controller), ``node`` (Identity + Node) and ``all`` (every
service, for single-machine clusters). The Node service lives in :mod:`blockyard.csi.node`,
which must provide ``build_node_service(config: CsiConfig, runner: RpcRunner) ->
csi_pb2_grpc.NodeServicer``; a build without that module refuses the node modes at start.

The CSI socket is local (a unix socket shared with the sidecars), so it has no TLS. The client
of the volume server's management API (``--backend``) dials with ``backend_security``: mutual
TLS, or plaintext only to a loopback address unless ``--insecure`` (see :mod:`blockyard.tls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import importlib
import importlib.util
import logging
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc

from blockyard import tls
from blockyard.csi.controller import ControllerService, TopologySegment
from blockyard.csi.identity import IdentityService
from blockyard.csi.master_backend import MasterBackend, is_master_backend, parse_master_backend
from blockyard.csi.metrics import Metrics, MetricsHttpServer, NoMetrics, PrometheusMetrics
from blockyard.csi.node_config import NodeOptions
from blockyard.csi.proto import csi_pb2_grpc as pb_grpc
from blockyard.csi.publish_store import PublishStore
from blockyard.csi.rpc import RpcRunner
from blockyard.errors import BlockyardError, InvalidNameError, TlsConfigError, TlsFileError
from blockyard.iscsi.discovery import iqn_for_volume
from blockyard.server.client import VolumeServerClient
from blockyard.server.daemon import Address, parse_address

log = logging.getLogger("blockyard.csi.server")

NODE_MODULE: Final = "blockyard.csi.node"
DEFAULT_KUBELET_DIR: Final = "/var/lib/kubelet"
DEFAULT_STATE_DIR: Final = "/var/lib/blockyard/csi"
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 10.0
#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL (unix(7)).
MAX_SOCKET_PATH_BYTES: Final = 107
#: How long the stale-socket check waits for a live server to accept.
SOCKET_PROBE_TIMEOUT_S: Final = 1.0


class PluginMode(enum.Enum):
    CONTROLLER = "controller"
    NODE = "node"
    ALL = "all"

    @property
    def controller(self) -> bool:
        return self in (PluginMode.CONTROLLER, PluginMode.ALL)

    @property
    def node(self) -> bool:
        return self in (PluginMode.NODE, PluginMode.ALL)


class ConfigError(ValueError):
    """The command line cannot work as given (exit 2); the message says how to fix it."""


class StartError(Exception):
    """The plugin could not start (exit 1); the message says what and how to fix it."""


@dataclass(frozen=True, slots=True)
class CsiConfig:
    socket_path: Path
    mode: PluginMode
    node_id: str
    backend: str | None = None
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    kubelet_dir: Path = Path(DEFAULT_KUBELET_DIR)
    managed_prefix: str | None = None
    metrics_listen: Address | None = None
    topology: TopologySegment = field(default_factory=TopologySegment)
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    node_options: NodeOptions = field(default_factory=NodeOptions)
    backend_security: tls.TransportSecurity = tls.PLAINTEXT
    #: How the master of a ``master://`` backend is dialed (``backend_security`` then covers
    #: the copies' volume servers).
    master_security: tls.TransportSecurity = tls.PLAINTEXT


def parse_endpoint(text: str) -> Path:
    """``unix:///abs/path.sock`` (the CSI sidecars' form) or ``unix:/abs/path.sock``."""
    if not text.startswith("unix:"):
        raise ConfigError(f"--endpoint wants unix:///PATH.sock, got {text!r}")
    rest = text.removeprefix("unix:")
    if rest.startswith("//"):
        rest = rest[2:]
    path = Path(rest)
    if not path.is_absolute() or path.name == "":
        raise ConfigError(
            f"--endpoint wants an absolute socket path (unix:///PATH.sock), got {text!r}"
        )
    if len(str(path).encode()) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"--endpoint path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes, the limit of "
            "a unix socket address; use a shorter path"
        )
    return path


def parse_mode(text: str) -> PluginMode:
    try:
        return PluginMode(text)
    except ValueError as exc:
        raise ConfigError(
            f"--mode {text!r} is not one of {', '.join(m.value for m in PluginMode)}"
        ) from exc


def check_managed_prefix(prefix: str | None, mode: PluginMode) -> str | None:
    """The IQN prefix of the targets the node plugin may log out of. Required where the node
    service runs: it must never disconnect sessions it does not own (nodes may boot from the
    same storage)."""
    if prefix is None or prefix == "":
        if mode.node:
            raise ConfigError(
                f"--managed-prefix is required in {mode.value} mode: give the IQN prefix of the "
                "blockyard targets (the volume servers' --iqn-prefix, e.g. "
                "iqn.2026-11.io.blockyard); the node plugin only ever touches those sessions"
            )
        return None
    try:
        iqn_for_volume(prefix, "probe")
    except InvalidNameError as exc:
        raise ConfigError(f"--managed-prefix: {exc}") from exc
    return prefix


def parse_topology(text: str) -> TopologySegment:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ConfigError(f"--topology wants KEY=VALUE, got {text!r}")
    return TopologySegment(key, value)


def build_config(
    *,
    endpoint: str,
    mode: str,
    node_id: str,
    backend: str | None,
    state_dir: str | None,
    kubelet_dir: str | None,
    managed_prefix: str | None,
    metrics_listen: str | None,
    topology: str | None,
    backend_security: tls.TransportSecurity = tls.PLAINTEXT,
    master_insecure: bool = False,
) -> CsiConfig:
    """Check the command line; raises :class:`ConfigError` for anything that cannot work.
    Reads no file: the TLS files are loaded at :meth:`CsiServer.start`."""
    plugin_mode = parse_mode(mode)
    socket_path = parse_endpoint(endpoint)
    if not node_id:
        raise ConfigError("--node-id is required: the name of this node (e.g. spec.nodeName)")
    if plugin_mode.controller and not backend:
        raise ConfigError(
            f"--backend is required in {plugin_mode.value} mode: the volume server's "
            "management API (HOST:PORT), or master://HOST:PORT[,HOST:PORT] for the master"
        )
    # The master is dialed with the same certificate, but checked against the host named in
    # master://: --tls-server-name is the name the volume servers' shared certificate carries.
    master_security = dataclasses.replace(backend_security, server_name=None)
    if master_insecure:
        if not (backend and is_master_backend(backend)):
            raise ConfigError("--master-insecure is for --backend master://...; drop it")
        master_security = tls.TransportSecurity(insecure=True)
    if backend and is_master_backend(backend):
        try:
            for address in parse_master_backend(backend):
                tls.check_dial(address, master_security)
        except ValueError as exc:  # InvalidArgumentError and TlsConfigError are ones too
            raise ConfigError(str(exc)) from exc
    elif backend:
        try:
            parse_address(backend, option="--backend")
            tls.check_dial(backend, backend_security)
        except ValueError as exc:  # TlsConfigError is one too
            raise ConfigError(str(exc)) from exc
    elif backend_security.tls is not None or backend_security.insecure:
        raise ConfigError("the --tls-* flags and --insecure are for --backend; give --backend")
    metrics: Address | None = None
    if metrics_listen:
        try:
            metrics = parse_address(metrics_listen, option="--metrics-listen")
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return CsiConfig(
        socket_path=socket_path,
        mode=plugin_mode,
        node_id=node_id,
        backend=backend or None,
        state_dir=Path(state_dir or DEFAULT_STATE_DIR),
        kubelet_dir=Path(kubelet_dir or DEFAULT_KUBELET_DIR),
        managed_prefix=check_managed_prefix(managed_prefix, plugin_mode),
        metrics_listen=metrics,
        topology=parse_topology(topology) if topology else TopologySegment(),
        backend_security=backend_security,
        master_security=master_security,
    )


def claim_socket_path(path: Path) -> None:
    """Make ``path`` free for our socket: its directory must exist; a socket file nobody serves
    is stale and removed; a live socket or any other file is refused."""
    if not path.parent.is_dir():
        raise ConfigError(
            f"the endpoint directory {path.parent} does not exist or is not a directory; "
            "create it (kubelet's plugin directory, usually mounted into the pod) or fix "
            "--endpoint"
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(
            f"{path} exists and is not a socket; refusing to replace it. Remove it or choose "
            "another --endpoint"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(SOCKET_PROBE_TIMEOUT_S)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale CSI socket %s", path)
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise StartError(f"cannot check whether {path} is in use: {exc}") from exc
    raise StartError(
        f"another process is serving {path}; stop it first, or choose another --endpoint"
    )


def node_service_available() -> bool:
    return importlib.util.find_spec(NODE_MODULE) is not None


class CsiServer:
    """The gRPC server of one plugin process. ``start`` then ``stop``; not restartable.

    With ``config.metrics_listen`` it also serves Prometheus metrics over HTTP there; the
    ``metrics`` given must then be a :class:`PrometheusMetrics` (one is made when none is)."""

    def __init__(self, config: CsiConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        if metrics is None and config.metrics_listen is not None:
            metrics = PrometheusMetrics()
        self._metrics: Metrics = metrics or NoMetrics()
        self._server: grpc.aio.Server | None = None
        self._client: VolumeServerClient | MasterBackend | None = None
        self._metrics_http: MetricsHttpServer | None = None

    async def start(self) -> None:
        """Serve on the socket; raises :class:`ConfigError` or :class:`StartError`."""
        config = self.config
        if config.mode.node and not node_service_available():
            raise ConfigError(
                f"--mode {config.mode.value}: node service not available in this build "
                f"({NODE_MODULE} is missing); run --mode controller"
            )
        claim_socket_path(config.socket_path)
        store = None
        if config.mode.controller:
            try:
                store = PublishStore(config.state_dir)
            except BlockyardError as exc:
                raise StartError(str(exc)) from exc
        if config.backend:
            try:
                self._client = self._open_backend(config)
            except TlsConfigError as exc:
                raise ConfigError(str(exc)) from exc
            except TlsFileError as exc:
                raise StartError(str(exc)) from exc
        server = grpc.aio.server()
        pb_grpc.add_IdentityServicer_to_server(
            IdentityService(self._client, RpcRunner("Identity", self._metrics)), server
        )
        if store is not None:
            assert self._client is not None
            controller = ControllerService(
                self._client,
                store,
                RpcRunner("Controller", self._metrics),
                topology=config.topology,
            )
            pb_grpc.add_ControllerServicer_to_server(controller, server)
        if config.mode.node:
            node = importlib.import_module(NODE_MODULE)
            service = node.build_node_service(config, RpcRunner("Node", self._metrics))
            pb_grpc.add_NodeServicer_to_server(service, server)
        try:
            server.add_insecure_port(f"unix://{config.socket_path}")
        except RuntimeError as exc:
            raise StartError(f"cannot listen on {config.socket_path}: {exc}") from exc
        await server.start()
        self._server = server
        log.info(
            "CSI %s plugin serving on %s (node %s)",
            config.mode.value,
            config.socket_path,
            config.node_id,
        )
        if config.metrics_listen is not None:
            await self._serve_metrics(config.metrics_listen)

    @staticmethod
    def _open_backend(config: CsiConfig) -> VolumeServerClient | MasterBackend:
        assert config.backend is not None
        security = config.backend_security
        if is_master_backend(config.backend):
            if security.tls is not None:
                # Read the TLS files now, so unusable ones fail the start (exit 1) as they do
                # for a volume server backend, not the first RPC.
                tls.load(security.tls)
            return MasterBackend(
                parse_master_backend(config.backend),
                security=security,
                master_security=config.master_security,
            )
        return VolumeServerClient(config.backend, security=security)

    async def _serve_metrics(self, address: Address) -> None:
        """Serve /metrics on ``address``; a bind failure stops the plugin again and raises
        :class:`StartError`."""
        assert isinstance(self._metrics, PrometheusMetrics), "--metrics-listen needs Prometheus"
        http = MetricsHttpServer(self._metrics.registry)
        try:
            await asyncio.to_thread(http.start, address.host, address.port)
        except OSError as exc:
            await self.stop()
            raise StartError(
                f"cannot serve metrics on {address} (--metrics-listen): {exc}; choose a free "
                "port on a local address, or leave --metrics-listen out"
            ) from exc
        self._metrics_http = http
        log.info("serving Prometheus metrics on http://%s/metrics", self.metrics_address)

    @property
    def metrics_address(self) -> Address | None:
        """Where /metrics is served (the chosen port when --metrics-listen gave port 0)."""
        if self._metrics_http is None or self.config.metrics_listen is None:
            return None
        return Address(self.config.metrics_listen.host, self._metrics_http.port)

    def ready_line(self) -> str:
        line = f"READY endpoint=unix://{self.config.socket_path} mode={self.config.mode.value}"
        if self.metrics_address is not None:
            line += f" metrics=http://{self.metrics_address}/metrics"
        return line

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self) -> None:
        """Stop taking RPCs, let running ones finish within the shutdown timeout, then stop
        the metrics endpoint and remove the socket file."""
        grace_s = self.config.shutdown_timeout_s
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.stop)
        if self._client is not None:
            await self._client.close()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.config.socket_path.lstat().st_mode):
                self.config.socket_path.unlink()
