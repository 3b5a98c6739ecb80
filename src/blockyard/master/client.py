"""An async client of the master's API (``blockyard.v1.Master``) for the CLI, the CSI
controller and tests.

It takes every master address (``HOST:PORT[,HOST:PORT...]``) and finds the leader: a call
answered FAILED_PRECONDITION with the ``blockyard-leader`` trailing metadata goes to the named
leader next; a master that cannot be reached (UNAVAILABLE) is skipped for the next address. The
whole call, redirects and retries included, is bounded by one deadline. A failed call raises
the :class:`~blockyard.errors.BlockyardError` subclass its status code maps to
(:mod:`blockyard.server.status`), with the master's message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Final, TypeVar

import grpc

from blockyard import tls
from blockyard.errors import InvalidArgumentError, ServerUnavailableError
from blockyard.master.proto import master_pb2 as mpb
from blockyard.master.proto import master_pb2_grpc as mpb_grpc
from blockyard.server.status import error_for

#: The trailing metadata key a follower names the leader with (see master.proto).
LEADER_METADATA_KEY: Final = "blockyard-leader"
#: Deadline of a whole call (redirects and retries included) that only reads state.
DEFAULT_TIMEOUT_S: Final = 30.0
#: Deadline of calls that create or delete copies on volume servers.
DEFAULT_SLOW_TIMEOUT_S: Final = 300.0
#: Pause before trying the list of masters again after none answered (a leader election or a
#: restart takes about one etcd lease TTL).
RETRY_PAUSE_S: Final = 0.25
#: Most addresses a client takes (a master group is 1 to 3 masters; this bounds typos).
MAX_ADDRESSES: Final = 9

Resp = TypeVar("Resp")


def parse_masters(spec: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` → the addresses, checked."""
    addresses = [a.strip() for a in spec.split(",") if a.strip()]
    if not addresses:
        raise InvalidArgumentError("no master address given: use --master HOST:PORT[,HOST:PORT]")
    if len(addresses) > MAX_ADDRESSES:
        raise InvalidArgumentError(
            f"{len(addresses)} master addresses given; at most {MAX_ADDRESSES} are taken"
        )
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgumentError(
                f"master address {a!r} is not HOST:PORT (e.g. 127.0.0.1:9333)"
            )
    return addresses


def _leader_of(exc: grpc.aio.AioRpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == LEADER_METADATA_KEY and isinstance(value, str) and value:
            return value
    return None


class MasterClient:
    """A client of a master group. Not thread-safe: use it from the event loop that made it."""

    def __init__(
        self,
        masters: str | Sequence[str],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        slow_timeout_s: float = DEFAULT_SLOW_TIMEOUT_S,
        security: tls.TransportSecurity = tls.PLAINTEXT,
    ) -> None:
        self.addresses = parse_masters(masters) if isinstance(masters, str) else list(masters)
        if not self.addresses:
            raise InvalidArgumentError("no master address given")
        self._timeout_s = timeout_s
        self._slow_timeout_s = slow_timeout_s
        self._security = security
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: The address that answered last (the leader, as far as we know).
        self._current = self.addresses[0]

    async def __aenter__(self) -> MasterClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    def _stub(self, address: str) -> mpb_grpc.MasterAsyncStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = tls.open_channel(address, self._security)
        return mpb_grpc.MasterStub(ch)

    async def _call(
        self,
        pick: Callable[[mpb_grpc.MasterAsyncStub], Callable[..., Awaitable[Resp]]],
        request: object,
        *,
        slow: bool = False,
    ) -> Resp:
        deadline = time.monotonic() + (self._slow_timeout_s if slow else self._timeout_s)
        order = [self._current] + [a for a in self.addresses if a != self._current]
        tried: list[str] = []
        last: grpc.aio.AioRpcError | None = None
        while True:
            address = order.pop(0) if order else None
            if address is None:
                # Every address failed once: pause (an election may be under way), then again.
                if time.monotonic() + RETRY_PAUSE_S >= deadline:
                    break
                await asyncio.sleep(RETRY_PAUSE_S)
                order = list(self.addresses)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            tried.append(address)
            try:
                resp = await pick(self._stub(address))(request, timeout=left)
            except grpc.aio.AioRpcError as exc:
                last = exc
                code = exc.code()
                leader = _leader_of(exc) if code == grpc.StatusCode.FAILED_PRECONDITION else None
                if leader is not None and leader != address:
                    order = [leader] + [a for a in order if a != leader]
                    continue
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue
                raise error_for(code, exc.details() or "no details") from exc
            self._current = address
            return resp
        hint = tls.transport_hint(self._security, tls.target_host(self.addresses[0]) or "")
        detail = "" if last is None else f"; last answer: {last.details() or last.code().name}"
        raise ServerUnavailableError(
            f"no master answered (tried {', '.join(dict.fromkeys(tried)) or 'none'}){detail}; "
            f"is `blockyard master` running there? ({hint})"
        )

    # ---- volumes ---------------------------------------------------------------------------

    async def create_volume(
        self,
        name: str,
        size_bytes: int,
        *,
        replica_count: int = 0,
        mode: int = 0,
        zones: Sequence[str] = (),
        parameters: dict[str, str] | None = None,
    ) -> mpb.VolumeInfo:
        request = mpb.MasterCreateVolumeRequest(
            name=name,
            size_bytes=size_bytes,
            replica_count=replica_count,
            mode=mode,  # type: ignore[arg-type]
            zones=list(zones),
            parameters=parameters or {},
        )
        return await self._call(lambda s: s.CreateVolume, request, slow=True)

    async def delete_volume(self, name: str) -> bool:
        resp: mpb.MasterDeleteVolumeResponse = await self._call(
            lambda s: s.DeleteVolume, mpb.MasterDeleteVolumeRequest(name=name), slow=True
        )
        return resp.existed

    async def get_volume(self, name: str) -> mpb.VolumeInfo:
        return await self._call(lambda s: s.GetVolume, mpb.MasterGetVolumeRequest(name=name))

    async def list_volumes(
        self, max_entries: int = 0, starting_token: str = ""
    ) -> mpb.MasterListVolumesResponse:
        request = mpb.MasterListVolumesRequest(
            max_entries=max_entries, starting_token=starting_token
        )
        return await self._call(lambda s: s.ListVolumes, request)

    async def list_all_volumes(self) -> list[mpb.VolumeInfo]:
        out: list[mpb.VolumeInfo] = []
        token = ""
        while True:
            page = await self.list_volumes(starting_token=token)
            out.extend(page.volumes)
            if not page.next_token or page.next_token == token:
                return out
            token = page.next_token

    async def expand_volume(self, name: str, size_bytes: int) -> mpb.VolumeInfo:
        request = mpb.MasterExpandVolumeRequest(name=name, size_bytes=size_bytes)
        return await self._call(lambda s: s.ExpandVolume, request, slow=True)

    # ---- servers ---------------------------------------------------------------------------

    async def list_servers(self) -> list[mpb.ServerInfo]:
        resp: mpb.ListServersResponse = await self._call(
            lambda s: s.ListServers, mpb.ListServersRequest()
        )
        return list(resp.servers)

    async def drain_server(self, server_id: str) -> mpb.ServerInfo:
        request = mpb.DrainServerRequest(server_id=server_id)
        return await self._call(lambda s: s.DrainServer, request)

    async def forget_server(self, server_id: str) -> bool:
        resp: mpb.ForgetServerResponse = await self._call(
            lambda s: s.ForgetServer, mpb.ForgetServerRequest(server_id=server_id)
        )
        return resp.existed

    async def mark_out_of_sync(
        self, volume: str, epoch: int, server_id: str, replica_address: str, sent_mono_ns: int
    ) -> None:
        """The degrade decision: returns once the master recorded the replica out of sync."""
        request = mpb.MarkOutOfSyncRequest(
            volume=volume,
            epoch=epoch,
            server_id=server_id,
            replica_address=replica_address,
            sent_mono_ns=sent_mono_ns,
        )
        await self._call(lambda s: s.MarkOutOfSync, request)

    async def get_leader(self) -> mpb.LeaderInfo:
        return await self._call(lambda s: s.GetLeader, mpb.GetLeaderRequest())
