"""The master process: the store, the gRPC server and the leader loop.

:meth:`MasterProcess.start` opens the store and binds the gRPC listener, or undoes both and
raises :class:`MasterStartError`; a failed start leaves nothing held, so starting again works.
The leader loop campaigns through the store; on winning it loads every record into a *new*
:class:`~blockyard.master.core.MasterCore` (whose clock starts then, so nothing is promoted
until one lease TTL plus the margin has passed: leases a previous leader granted are invisible
to it) and runs the core's timers until leadership is lost, then campaigns again. While not
leading, every RPC answers FAILED_PRECONDITION naming the leader.

:meth:`MasterProcess.close` stops within its bound: the leader loop first, then the gRPC
server (running calls get a grace period), then the store (etcd: the leader key's lease is
revoked so a follower takes over at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import grpc

from blockyard import tls
from blockyard.csi.metrics import MetricsHttpServer
from blockyard.errors import BlockyardError
from blockyard.master import model
from blockyard.master.core import MasterConfig, MasterCore
from blockyard.master.leases import LeasePolicy
from blockyard.master.metrics import SAMPLE_INTERVAL_S, MasterMetrics
from blockyard.master.proto import master_pb2_grpc as mpb_grpc
from blockyard.master.service import ClientFactory, CopyClient, MasterService
from blockyard.master.store import MasterStore
from blockyard.server.client import VolumeServerClient
from blockyard.server.daemon import Address

log = logging.getLogger("blockyard.master")

#: Concurrent RPCs (heartbeat streams included); more get RESOURCE_EXHAUSTED from gRPC.
MAX_CONCURRENT_RPCS: Final = 1024
#: How the master's API is named in errors about serving it.
MASTER_API: Final = "the master API"
#: How long start() waits for the first campaign before reporting READY as a follower.
FIRST_CAMPAIGN_WAIT_S: Final = 5.0
#: Pause before campaigning again after a failed campaign or a lost leadership.
RECAMPAIGN_PAUSE_S: Final = 0.5
#: The core's timers run this many times per heartbeat interval.
TICKS_PER_INTERVAL: Final = 5
_NS_PER_S: Final = 1_000_000_000


class MasterStartError(Exception):
    """The master could not start; the message says what and how to fix it."""


@dataclass(frozen=True, slots=True)
class MasterProcessConfig:
    listen: Address
    store_url: str
    lease_ttl_s: float = 2.0
    heartbeat_interval_s: float = 0.5
    replace_after_s: float = 600.0
    master_id: str = ""
    shutdown_timeout_s: float = 10.0
    #: The address other masters and clients are told to use (default: the listen address).
    advertise: str = ""
    #: Prometheus metrics over plain HTTP (no secrets in them, like the other daemons').
    metrics_listen: Address | None = None
    #: How the master serves its own API and dials the volume servers' management APIs, with
    #: one certificate (serverAuth and clientAuth): mutual TLS, or plaintext, which off
    #: loopback needs ``insecure`` — the same rule and flags as every other gRPC endpoint.
    server_security: tls.TransportSecurity = tls.PLAINTEXT


class MasterProcess:
    def __init__(
        self,
        config: MasterProcessConfig,
        *,
        store_factory: Callable[[str], MasterStore] | None = None,
        client_for: ClientFactory | None = None,
    ) -> None:
        self.config = config
        self.master_id = config.master_id or f"master-{secrets.token_hex(4)}"
        self._store_factory = store_factory
        self._client_for = client_for or self._volume_server_client
        self.store: MasterStore | None = None
        self.service: MasterService | None = None
        self._grpc: grpc.aio.Server | None = None
        self._leader_task: asyncio.Task[None] | None = None
        self.leading = asyncio.Event()
        self.port = 0
        self.metrics: MasterMetrics | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.metrics_port = 0
        self.core_config = MasterConfig(
            master_id=self.master_id,
            lease=LeasePolicy.from_seconds(config.lease_ttl_s),
            heartbeat_interval_ns=int(config.heartbeat_interval_s * _NS_PER_S),
            replace_after_ns=int(config.replace_after_s * _NS_PER_S),
        )

    @property
    def address(self) -> str:
        return self.config.advertise or str(Address(self.config.listen.host, self.port))

    def ready_line(self) -> str:
        role = "leader" if self.leading.is_set() else "follower"
        line = f"READY master={self.address} id={self.master_id} role={role}"
        if self._metrics_http is not None and self.config.metrics_listen is not None:
            metrics = Address(self.config.metrics_listen.host, self.metrics_port)
            line += f" metrics=http://{metrics}/metrics"
        return line

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    def _volume_server_client(self, api: str) -> CopyClient:
        return VolumeServerClient(api, security=self.config.server_security)

    async def _start(self) -> None:
        cfg = self.config
        files = cfg.server_security.tls
        credentials: grpc.ServerCredentials | None = None
        try:
            # Plaintext off loopback only with --insecure, as the volume server's API; a bad
            # file stops the start with one line, not the first dial or handshake.
            tls.check_listen(str(cfg.listen), cfg.listen.host, cfg.server_security, api=MASTER_API)
            if files is not None:
                credentials = tls.server_credentials(files)
        except BlockyardError as exc:
            raise MasterStartError(str(exc)) from exc
        if self._store_factory is not None:
            store = self._store_factory(cfg.store_url)
        else:
            from blockyard.master.store_url import make_store  # noqa: PLC0415

            store = make_store(cfg.store_url)
        try:
            await store.open()
        except BlockyardError as exc:
            raise MasterStartError(f"cannot open the store {cfg.store_url}: {exc}") from exc
        self.store = store
        kind = cfg.store_url.partition("://")[0] or "unknown"
        self.service = MasterService(
            MasterCore(self.core_config, time.monotonic_ns()),
            store,
            self._client_for,
            address="",
            store_kind=kind,
        )
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS
        )
        mpb_grpc.add_MasterServicer_to_server(self.service, server)
        failure = (
            f"cannot listen on {cfg.listen}: the address is in use or not local; stop whatever "
            "uses it or pick another --listen"
        )
        try:
            port = tls.bind(server, str(cfg.listen), credentials)
        except RuntimeError as exc:
            raise MasterStartError(failure) from exc
        if port == 0:
            raise MasterStartError(failure)
        self._grpc = server
        await server.start()
        self.port = port
        self.service.address = self.address
        if cfg.metrics_listen is not None:
            await self._start_metrics(cfg.metrics_listen)
        self._leader_task = asyncio.create_task(self._leader_loop(), name="master leader loop")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_CAMPAIGN_WAIT_S):
                await self.leading.wait()

    async def _start_metrics(self, addr: Address) -> None:
        metrics = MasterMetrics()
        http = MetricsHttpServer(metrics.registry)
        try:
            await asyncio.to_thread(http.start, addr.host, addr.port)
        except OSError as exc:
            raise MasterStartError(
                f"cannot serve metrics on {addr} (--metrics-listen): {exc.strerror or exc}; "
                "stop whatever uses that address or pick another --metrics-listen"
            ) from exc
        self.metrics, self._metrics_http, self.metrics_port = metrics, http, http.port
        assert self.service is not None
        self.service.on_failover = metrics.failovers.inc
        self._sampler = asyncio.create_task(self._sample_loop(metrics), name="master metrics")

    async def _sample_loop(self, metrics: MasterMetrics) -> None:
        service = self.service
        assert service is not None
        while True:
            metrics.sample(service.core, self.leading.is_set(), time.monotonic_ns())
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def _leader_loop(self) -> None:
        store, service = self.store, self.service
        assert store is not None and service is not None
        interval_s = self.config.heartbeat_interval_s / TICKS_PER_INTERVAL
        while True:
            try:
                await store.campaign(self.master_id, self.address)
                snapshot = await store.load()
                core = MasterCore(self.core_config, time.monotonic_ns())
                core.load(
                    [
                        (model.decode_server(r.value, f"servers/{i}"), r.version)
                        for i, r in snapshot.servers.items()
                    ],
                    [
                        (model.decode_volume(r.value, f"volumes/{i}"), r.version)
                        for i, r in snapshot.volumes.items()
                    ],
                )
            except BlockyardError as exc:
                log.warning("campaign or load failed: %s; retrying", exc)
                await asyncio.sleep(RECAMPAIGN_PAUSE_S)
                continue
            service.core = core
            self.leading.set()
            log.info(
                "master %s leads with %d servers and %d volumes; promotions held for %.1f s",
                self.master_id,
                len(core.registry.servers),
                len(core.registry.volumes),
                self.core_config.lease.promotion_delay_ns / _NS_PER_S,
            )
            ticker = asyncio.create_task(service.tick_loop(interval_s))
            try:
                await store.leadership_lost.wait()
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                self.leading.clear()
            log.warning("master %s lost leadership; campaigning again", self.master_id)
            await asyncio.sleep(RECAMPAIGN_PAUSE_S)

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop everything within about ``timeout_s`` (default: the configured bound)."""
        budget = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        task, self._leader_task = self._leader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.leading.clear()
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        http, self._metrics_http = self._metrics_http, None
        if http is not None:
            await asyncio.to_thread(http.stop)
        server, self._grpc = self._grpc, None
        if server is not None:
            await server.stop(grace=max(0.1, budget * 0.3))
        service = self.service
        if service is not None:
            await service.drain(max(0.1, min(budget * 0.3, deadline - loop.time())))
        store, self.store = self.store, None
        if store is not None:
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await store.close()
            except (TimeoutError, BlockyardError) as exc:
                log.warning("closing the store: %s", exc)
