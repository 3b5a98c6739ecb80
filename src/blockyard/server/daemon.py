"""The volume server process: iSCSI listeners + volume manager + gRPC management API.

:meth:`VolumeServerDaemon.start` opens the data directory, binds every listener and the API,
or undoes all of it and raises :class:`StartError`. :meth:`VolumeServerDaemon.close` stops in
the order that keeps data safe: the API first (no new operations), then the iSCSI listeners
(running commands finish or are aborted), then the manager (every volume flushed and closed).
Both may be called again on the same object: a failed or stopped daemon starts anew.

The management API is served with mutual TLS when ``api_security`` has TLS files; without
them it serves only on a loopback address unless ``api_security.insecure`` (see
:mod:`blockyard.tls`). Both are checked, and the files loaded, before the data directory is
touched.

The daemon also runs the data directory's space check (:mod:`blockyard.server.space_task`)
and, with ``metrics_listen``, serves Prometheus metrics (:mod:`blockyard.server.metrics`) over
plain HTTP: like the CSI driver's endpoint, on any address without TLS (metrics carry no
secrets).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import grpc

from blockyard import tls
from blockyard.csi.metrics import MetricsHttpServer
from blockyard.errors import BlockyardError, TlsConfigError, TlsFileError
from blockyard.server.api import VolumeServerService, add_to_server
from blockyard.server.heartbeat import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    HeartbeatClient,
    ServerIdentity,
)
from blockyard.server.iscsi_server import DictTargetRegistry, IscsiServer, ServerSettings
from blockyard.server.manager import DEFAULT_IQN_PREFIX, PortalGroup, VolumeManager
from blockyard.server.metrics import (
    LoopSampler,
    NoServerMetrics,
    PrometheusServerMetrics,
    ServerMetrics,
    manager_view,
)
from blockyard.server.server_id import load_or_create_server_id
from blockyard.server.space_task import DEFAULT_SOFT_THRESHOLD, SoftThreshold, SpaceTask

log = logging.getLogger("blockyard.server")

MANAGEMENT_API: Final = "the management API"
#: Concurrent management RPCs; more get RESOURCE_EXHAUSTED from gRPC itself.
MAX_CONCURRENT_RPCS: Final = 64
#: Share of the shutdown bound each stage may use (API, iSCSI; the manager gets the rest).
_API_SHARE: Final = 0.2
_ISCSI_SHARE: Final = 0.3


class StartError(Exception):
    """The server could not start; the message says what and how to fix it."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, option: str) -> Address:
    """``HOST:PORT`` or ``[V6]:PORT``; port 0 picks a free port."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 0xFFFF:
        raise ValueError(f"{option} wants HOST:PORT (e.g. 127.0.0.1:3260), got {text!r}")
    return Address(host, int(port_text))


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    data_dir: str
    iscsi_listen: tuple[Address, ...]
    api_listen: Address
    iqn_prefix: str = DEFAULT_IQN_PREFIX
    advertise_host: str | None = None
    shutdown_timeout_s: float = 30.0
    api_security: tls.TransportSecurity = tls.PLAINTEXT
    replication_listen: Address | None = None
    replication_advertise: str | None = None
    #: Prometheus metrics over plain HTTP (like the CSI driver's endpoint: no TLS, any address).
    metrics_listen: Address | None = None
    space_threshold: SoftThreshold = DEFAULT_SOFT_THRESHOLD
    #: Masters to register and heartbeat with (``--master``); empty: standalone.
    masters: tuple[str, ...] = ()
    zone: str = ""
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S


class VolumeServerDaemon:
    def __init__(self, config: DaemonConfig) -> None:
        if not config.iscsi_listen:
            raise ValueError("at least one iSCSI listener is needed")
        self.config = config
        self.manager: VolumeManager | None = None
        self._iscsi: list[IscsiServer] = []
        self._grpc: grpc.aio.Server | None = None
        self.api_port = 0
        self.metrics: ServerMetrics = NoServerMetrics()
        self._metrics_http: MetricsHttpServer | None = None
        self.metrics_port = 0
        self._space: SpaceTask | None = None
        self.heartbeat: HeartbeatClient | None = None
        self.server_id = ""

    @property
    def iscsi_addresses(self) -> list[Address]:
        return [Address(s.host, s.port) for s in self._iscsi]

    def ready_line(self) -> str:
        iscsi = ",".join(str(a) for a in self.iscsi_addresses)
        api = Address(self.config.api_listen.host, self.api_port)
        line = f"READY iscsi={iscsi} api={api}"
        if self.manager is not None and self.manager.replication.address:
            line += f" replication={self.manager.replication.address}"
        if self._metrics_http is not None and self.config.metrics_listen is not None:
            metrics = Address(self.config.metrics_listen.host, self.metrics_port)
            line += f" metrics=http://{metrics}/metrics"
        return line

    async def start(self) -> None:
        """Serve, or raise StartError with everything already undone."""
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        try:
            tls.check_listen(
                str(cfg.api_listen), cfg.api_listen.host, cfg.api_security, api=MANAGEMENT_API
            )
            for master in cfg.masters:
                tls.check_dial(master, cfg.api_security)
            files = cfg.api_security.tls
            credentials = None if files is None else tls.server_credentials(files)
        except (TlsConfigError, TlsFileError) as exc:
            raise StartError(str(exc)) from exc
        groups: list[PortalGroup] = []
        self._iscsi = []
        for tag, addr in enumerate(cfg.iscsi_listen, start=1):
            advertised = cfg.advertise_host or (
                socket.gethostname() if _is_wildcard(addr.host) else addr.host
            )
            # Each listener is its own target port and target port group, both numbered by
            # the portal group tag, so ALUA states can differ per portal.
            settings = ServerSettings(
                advertised_host=advertised,
                relative_target_port_id=tag,
                target_port_group_id=tag,
            )
            registry = DictTargetRegistry()
            server = IscsiServer(registry, addr.host, addr.port, settings=settings)
            self._iscsi.append(server)
            groups.append(PortalGroup(tag, server, registry, advertised))
        try:
            rep = cfg.replication_listen
            self.manager = VolumeManager(
                cfg.data_dir,
                groups,
                iqn_prefix=cfg.iqn_prefix,
                replication_listen=None if rep is None else (rep.host, rep.port),
                replication_advertise=cfg.replication_advertise,
                leases=bool(cfg.masters),
            )
        except BlockyardError as exc:
            raise StartError(str(exc)) from exc
        self.metrics = PrometheusServerMetrics() if cfg.metrics_listen else NoServerMetrics()
        self.manager.replication.observer = self.metrics
        try:
            await self.manager.start()
        except BlockyardError as exc:
            raise StartError(f"cannot open data directory {cfg.data_dir}: {exc}") from exc
        except OSError as exc:
            if cfg.replication_listen is not None and self.manager.replication.listener is None:
                raise StartError(
                    f"cannot listen for replication on {cfg.replication_listen}: "
                    f"{exc.strerror or exc}; stop whatever uses that address or pick another "
                    "--replication-listen"
                ) from exc
            raise StartError(
                f"cannot use data directory {cfg.data_dir}: {exc}; check the path and its "
                "permissions"
            ) from exc
        for server, addr in zip(self._iscsi, cfg.iscsi_listen, strict=True):
            try:
                await server.start()
            except OSError as exc:
                raise StartError(
                    f"cannot listen for iSCSI on {addr}: {exc.strerror or exc}; stop whatever "
                    "uses that address or pick another --iscsi-listen"
                ) from exc
        self._space = SpaceTask(self.manager, self.metrics, cfg.space_threshold)
        await self._space.start()
        await self._start_api(credentials)
        if cfg.metrics_listen is not None:
            await self._start_metrics(cfg.metrics_listen)
        if cfg.masters:
            await self._start_heartbeat()
        log.info(
            "volume server ready: %s (management API: %s)",
            self.ready_line(),
            cfg.api_security.describe(),
        )

    async def _start_api(self, credentials: grpc.ServerCredentials | None) -> None:
        assert self.manager is not None
        addr = self.config.api_listen
        # SO_REUSEPORT (gRPC's default) would let a second server bind the same port silently.
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS
        )
        add_to_server(VolumeServerService(self.manager), server)
        failure = (
            f"cannot listen for the management API on {addr}: the address is in use or not "
            "local; stop whatever uses it or pick another --api-listen"
        )
        try:
            port = tls.bind(server, str(addr), credentials)
        except RuntimeError as exc:
            raise StartError(failure) from exc
        if port == 0:
            raise StartError(failure)
        self._grpc = server
        await server.start()
        self.api_port = port

    async def _start_heartbeat(self) -> None:
        assert self.manager is not None
        cfg = self.config
        try:
            self.server_id = await self.manager.offload(
                "read the server id", load_or_create_server_id, cfg.data_dir
            )
        except BlockyardError as exc:
            raise StartError(str(exc)) from exc
        api_host = cfg.advertise_host or (
            socket.gethostname() if _is_wildcard(cfg.api_listen.host) else cfg.api_listen.host
        )
        identity = ServerIdentity(
            server_id=self.server_id,
            iscsi_portals=tuple(
                str(Address(g.advertised_host, g.port)) for g in self.manager.portal_groups
            ),
            api=str(Address(api_host, self.api_port)),
            replication=self.manager.replication.address,
            zone=cfg.zone,
        )
        self.heartbeat = HeartbeatClient(
            self.manager,
            identity,
            cfg.masters,
            interval_s=cfg.heartbeat_interval_s,
            security=cfg.api_security,
        )
        self.heartbeat.start()
        log.info("server %s heartbeats to %s", self.server_id, ", ".join(cfg.masters))

    async def _start_metrics(self, addr: Address) -> None:
        assert self.manager is not None
        metrics = self.metrics
        assert isinstance(metrics, PrometheusServerMetrics)
        metrics.sampler = LoopSampler(asyncio.get_running_loop(), manager_view(self.manager))
        http = MetricsHttpServer(metrics.registry)
        try:
            await asyncio.to_thread(http.start, addr.host, addr.port)
        except OSError as exc:
            raise StartError(
                f"cannot serve metrics on {addr} (--metrics-listen): {exc.strerror or exc}; "
                "stop whatever uses that address or pick another --metrics-listen"
            ) from exc
        self._metrics_http = http
        self.metrics_port = http.port

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop everything within about ``timeout_s`` (default: the configured bound)."""
        budget = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        heartbeat, self.heartbeat = self.heartbeat, None
        if heartbeat is not None:
            # First: the master must stop granting leases before the volumes go away.
            await heartbeat.stop()
        http, self._metrics_http = self._metrics_http, None
        if http is not None:
            await asyncio.to_thread(http.stop)
        space, self._space = self._space, None
        if space is not None:
            await space.stop()
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.stop(grace=budget * _API_SHARE)
        iscsi_budget = max(0.1, min(budget * _ISCSI_SHARE, deadline - loop.time()))
        await asyncio.gather(*(s.close(iscsi_budget) for s in self._iscsi))
        manager, self.manager = self.manager, None
        if manager is not None:
            await manager.close(max(0.1, deadline - loop.time()))

    @property
    def listeners(self) -> Sequence[IscsiServer]:
        return tuple(self._iscsi)
