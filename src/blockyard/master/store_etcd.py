"""``etcd://`` — the store of highly available masters: one leader by etcd lease election,
fenced by the leader key's create revision.

Client: **etcd3aio** (0.3). Checked against this project's grpcio 1.85 and protobuf 7.36 and
a real etcd 3.4 (Debian 12's etcd-server): KV, Txn, leases, keepalive and watch all work. Chosen
over aetcd, which also works, because etcd3aio ships type information (``py.typed``; the master
is mypy-strict), takes a deadline and a retry count on every call (a Txn is sent once, never
retried blindly: see below), balances over several endpoints on one grpc.aio channel, and
registers the etcd protos under their full paths (aetcd registers them as top-level
``rpc.proto``/``kv.proto``, names that can collide in protobuf's global descriptor pool). The
old ``etcd3`` package does not import with protobuf 7.

Keys (``PREFIX`` defaults to ``/blockyard/``):

- ``PREFIX leader``: ``{"master_id", "address"}``, attached to the leader's lease. Created only
  by a Txn comparing ``create_revision == 0``, so it has one writer at a time; its
  create revision is the **fencing token** (:attr:`LeaderInfo.token`).
- ``PREFIX <kind>/<id>``: records. A record's version is its ``mod_revision``.

Election: a campaign grants a lease (``election_ttl_s``, kept alive every third of it) and tries
the leader Txn; while another master leads it waits for the watch to report the key gone (or
re-tries every TTL). A kill -9'd leader stops its keepalives, etcd expires the lease and deletes
the key, and a follower wins within about a TTL. :attr:`leadership_lost` is set when this
master's keepalive goes unanswered past the lease's local expiry (``etcd_lease``), when etcd
says the lease is gone, or when the watch shows the leader key deleted or replaced.

Fencing: every put and delete is one Txn whose first compare is ``create_revision(leader key)
== token``. A deposed leader's write therefore fails *in etcd*, whatever this process believes
(a paused or partitioned master may not know it lost): :class:`StoreFencedError`. Once
:attr:`leadership_lost` is set, writes are refused locally too (etcd may still hold the key
for a moment; nobody else leads until it is gone, but this master has stopped leading). Txns go out
once (``max_attempts=1``): a retried Txn whose first attempt did land would see its own write as
a conflict; instead a caller re-puts, which the idempotent re-put rule makes safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import grpc
import grpc.aio
from etcd3aio import Etcd3Client, EtcdError
from etcd3aio._protobuf import Compare
from etcd3aio.kv import KVService, SortOrder, SortTarget, prefix_range_end

from blockyard.errors import (
    NotLeaderError,
    StoreClosedError,
    StoreConflictError,
    StoreFencedError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from blockyard.master.etcd_lease import LeaseDeadline, keepalive_pause_s, keepalive_timeout_s
from blockyard.master.store import (
    DEFAULT_OP_TIMEOUT_S,
    LeaderInfo,
    Snapshot,
    StoredRecord,
    check_expect_version,
    check_value,
    record_key,
)

_log = logging.getLogger(__name__)
T = TypeVar("T")

#: TTL of the leader's lease. etcd rounds a TTL up to its minimum (1.5 x its election timeout,
#: 2 s with the default 1 s); 3 s lets a keepalive every second miss once without losing.
DEFAULT_ELECTION_TTL_S: Final = 3
#: Keys read per Range while loading (a bounded response; gRPC's default receive limit is
#: 4 MiB and a record may be up to store.MAX_VALUE_BYTES).
LOAD_PAGE_KEYS: Final = 64
#: Bound on the pause between retries inside a campaign and after a broken watch.
RETRY_PAUSE_MAX_S: Final = 1.0
#: Bytes of a leader key's value we parse (it is two short strings).
LEADER_VALUE_MAX_BYTES: Final = 4096
#: mvccpb.Event.EventType DELETE (etcd api/mvccpb/kv.proto).
EVENT_DELETE: Final = 1

_LEADER_NAME: Final = "leader"


class EtcdStore:
    """A :class:`~blockyard.master.store.MasterStore` on an etcd v3 cluster."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = "/blockyard/",
        op_timeout_s: float = DEFAULT_OP_TIMEOUT_S,
        election_ttl_s: int = DEFAULT_ELECTION_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert prefix.startswith("/") and prefix.endswith("/"), prefix
        self.endpoints = tuple(endpoints)
        self.prefix = prefix
        self._leader_key = (prefix + _LEADER_NAME).encode()
        self._op_timeout_s = op_timeout_s
        self._ttl_s = election_ttl_s
        self._clock = clock
        self._client: Etcd3Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        # The lease this master campaigns with, its keepalive and local deadline.
        self._lease_id: int | None = None
        self._deadline = LeaseDeadline()
        self._keepalive_task: asyncio.Task[None] | None = None
        # Leadership.
        self._token: int | None = None  # fencing token of the leadership won last
        self._leading = False
        self._lost = asyncio.Event()
        self._lost.set()
        self._leader: LeaderInfo | None = None
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"EtcdStore({','.join(self.endpoints)!r}, prefix={self.prefix!r})"

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        client = Etcd3Client(list(self.endpoints), rpc_max_attempts=2)
        await client.connect()
        self._client = client
        try:
            # Proves the cluster answers (a linearizable read needs a quorum) and seeds leader().
            resp = await self._rpc("read the leader key", lambda kv: kv.get(self._leader_key))
        except BaseException:
            self._client = None
            await client.close()
            raise
        self._set_leader(resp.kvs[0] if resp.kvs else None)
        self._watch_task = self._spawn(self._watch_leader(int(resp.header.revision)), "watch")

    async def close(self) -> None:
        client = self._client
        if client is None:
            return
        # Taken before _lose(), which would revoke it in a task that the next lines cancel.
        lease_id, self._lease_id = self._lease_id, None
        self._lose("the store closed", expected=True)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if lease_id is not None:
            # Revoking deletes the leader key at once, so a follower need not wait for the TTL.
            await self._revoke(client, lease_id)
        self._client = None
        await client.close()

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(f"etcd-store-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- leadership --------------------------------------------------------------------------

    def leader(self) -> LeaderInfo | None:
        return self._leader

    @property
    def is_leader(self) -> bool:
        return self._leading and not self._lost.is_set()

    @property
    def leadership_lost(self) -> asyncio.Event:
        return self._lost

    async def campaign(
        self, master_id: str, address: str, *, timeout_s: float | None = None
    ) -> None:
        self._kv()
        value = json.dumps({"master_id": master_id, "address": address}).encode()
        budget = asyncio.timeout(timeout_s)
        try:
            async with budget:
                await self._campaign(master_id, address, value)
        except TimeoutError as exc:
            if not budget.expired():
                raise
            raise StoreTimeoutError(
                f"master {master_id} did not become leader within {timeout_s:g} s on etcd "
                f"{','.join(self.endpoints)}; {self._leader_text()}"
            ) from exc

    async def _campaign(self, master_id: str, address: str, value: bytes) -> None:
        pause_s = 0.1
        while True:
            try:
                lease_id = await self._live_lease()
                won, resp = await self._try_lead(lease_id, value)
            except (StoreUnavailableError, StoreTimeoutError) as exc:
                _log.warning("campaign of master %s: %s; retrying", master_id, exc)
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, RETRY_PAUSE_MAX_S)
                continue
            pause_s = 0.1
            kvs = resp.responses[0].response_range.kvs if not won else []
            if kvs and int(kvs[0].lease) == lease_id:
                # Already ours (campaign called again while leading): the key's creation
                # stands, and so does its token.
                won, token = True, int(kvs[0].create_revision)
            else:
                token = int(resp.header.revision)
            if won:
                self._token = token
                self._leader = LeaderInfo(master_id, address, self._token)
                if self._lost.is_set():  # a new leadership; while leading, waiters keep theirs
                    self._lost = asyncio.Event()
                self._leading = True
                _log.info("master %s leads (etcd token %d)", master_id, self._token)
                return
            self._set_leader(kvs[0] if kvs else None)
            changed = self._changed
            # The watch says when the key goes; re-trying every TTL covers a stalled watch.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._ttl_s)

    async def _try_lead(self, lease_id: int, value: bytes) -> tuple[bool, Any]:
        compare = [KVService.txn_compare_create_revision(self._leader_key, 0)]
        success = [KVService.txn_op_put(self._leader_key, value, lease=lease_id)]
        failure = [KVService.txn_op_get(self._leader_key)]
        resp = await self._rpc(
            "campaign",
            lambda kv: kv.txn(compare, success, failure, max_attempts=1),
        )
        return bool(resp.succeeded), resp

    async def _live_lease(self) -> int:
        """This master's lease, granted anew when the last one expired."""
        if self._lease_id is not None and not self._deadline.expired(self._clock()):
            return self._lease_id
        self._stop_keepalive()
        sent_s = self._clock()
        resp = await self._rpc("grant a lease", lambda _kv: self._lease_api().grant(self._ttl_s))
        self._lease_id = int(resp.ID)
        self._deadline = LeaseDeadline()
        self._deadline.confirmed(sent_s, float(resp.TTL))
        self._keepalive_task = self._spawn(self._keepalive(self._lease_id), "keepalive")
        return self._lease_id

    def _stop_keepalive(self) -> None:
        task, self._keepalive_task = self._keepalive_task, None
        if task is not None:
            task.cancel()

    async def _keepalive(self, lease_id: int) -> None:
        deadline = self._deadline
        lease_api = self._lease_api()
        failing = False
        while True:
            sent_s = self._clock()
            remaining_s = deadline.remaining_s(sent_s)
            answered = False
            try:
                async with asyncio.timeout(
                    keepalive_timeout_s(self._ttl_s, remaining_s, self._op_timeout_s)
                ):
                    call = lease_api.keep_alive(lease_id)
                    try:
                        reply = await call.read()
                    finally:
                        call.cancel()
            except (TimeoutError, grpc.aio.AioRpcError, EtcdError) as exc:
                # Once per failing spell: a retry follows within a moment.
                _log.log(
                    logging.DEBUG if failing else logging.WARNING,
                    "keepalive of etcd lease %x failed: %s; retrying until the lease runs out",
                    lease_id,
                    str(exc) or "no answer in time",
                )
                failing = True
            else:
                if reply is grpc.aio.EOF or int(reply.TTL) <= 0:
                    deadline.revoke()
                else:
                    deadline.confirmed(sent_s, float(reply.TTL))
                    answered = True
                    failing = False
            now_s = self._clock()
            if deadline.expired(now_s):
                self._lose(f"etcd lease {lease_id:x} expired or could not be renewed in time")
                return
            await asyncio.sleep(
                keepalive_pause_s(answered, self._ttl_s, deadline.remaining_s(now_s))
            )

    async def _watch_leader(self, revision: int) -> None:
        pause_s = 0.1
        while True:
            try:
                watch = self._client.watch if self._client else None
                if watch is None:
                    return
                async for resp in watch.watch(self._leader_key, start_revision=revision + 1):
                    for event in resp.events:
                        revision = max(revision, int(event.kv.mod_revision))
                        self._set_leader(None if event.type == EVENT_DELETE else event.kv)
                    pause_s = 0.1
            except (grpc.aio.AioRpcError, EtcdError) as exc:
                _log.warning("watch of the etcd leader key broke: %s; re-watching", exc)
            # A watch that ended or broke: re-read the key, then watch on from there.
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, RETRY_PAUSE_MAX_S)
            try:
                resp = await self._rpc("read the leader key", lambda kv: kv.get(self._leader_key))
            except (StoreUnavailableError, StoreTimeoutError) as exc:
                _log.warning("%s", exc)
                continue
            self._set_leader(resp.kvs[0] if resp.kvs else None)
            revision = int(resp.header.revision)

    def _set_leader(self, kv: Any) -> None:
        """Record the leader key as seen (None: no leader) and wake campaigns waiting on it."""
        if kv is None:
            self._leader = None
        else:
            self._leader = _parse_leader(kv)
        if self._leading and (kv is None or int(kv.create_revision) != self._token):
            self._lose("the etcd leader key was deleted or replaced")
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _lose(self, why: str, *, expected: bool = False) -> None:
        if not self._leading:
            return
        self._leading = False
        self._lost.set()
        _log.log(
            logging.INFO if expected else logging.WARNING,
            "leadership lost (etcd token %s): %s",
            self._token,
            why,
        )
        # Our lease is no use any more; revoking it removes a leader key etcd may still hold,
        # so another master need not wait out the TTL.
        lease_id, self._lease_id = self._lease_id, None
        self._stop_keepalive()
        client = self._client
        if lease_id is not None and client is not None:
            self._spawn(self._revoke(client, lease_id), "revoke")

    async def _revoke(self, client: Etcd3Client, lease_id: int) -> None:
        lease_api = client.lease
        if lease_api is None:
            return
        try:
            await lease_api.revoke(lease_id, timeout=self._op_timeout_s, max_attempts=1)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return  # already expired or revoked: what we wanted
            _log.warning("could not revoke etcd lease %x (it expires by itself): %s", lease_id, exc)
        except (TimeoutError, EtcdError) as exc:
            _log.warning("could not revoke etcd lease %x (it expires by itself): %s", lease_id, exc)

    def _leader_text(self) -> str:
        leader = self._leader
        if leader is None:
            return "no master leads now"
        return f"master {leader.master_id} at {leader.address} leads"

    # --- records -----------------------------------------------------------------------------

    async def load(self) -> Snapshot:
        start = self.prefix.encode()
        end = prefix_range_end(start)
        revision = 0
        records: dict[str, dict[str, StoredRecord]] = {}
        while True:
            resp = await self._rpc("load", functools.partial(_load_page, start, end, revision))
            if revision == 0:
                revision = int(resp.header.revision)  # every page reads at the first's revision
            for kv in resp.kvs:
                rest = bytes(kv.key)[len(self.prefix) :].decode("utf-8", "replace")
                kind, slash, id_ = rest.partition("/")
                if slash:  # keys without a kind (the leader key) are not records
                    records.setdefault(kind, {})[id_] = StoredRecord(
                        bytes(kv.value), int(kv.mod_revision)
                    )
            if not resp.more or not resp.kvs:
                return Snapshot(records=records, revision=revision)
            start = bytes(resp.kvs[-1].key) + b"\x00"

    async def put(self, kind: str, id: str, value: bytes, *, expect_version: int | None) -> int:
        key = record_key(kind, id)
        check_value(key, value)
        check_expect_version(key, expect_version)
        token = self._check_writer(key)
        full_key = (self.prefix + key).encode()
        value = bytes(value)
        compare = [self._fence(token), *_version_compare(full_key, expect_version)]
        success = [KVService.txn_op_put(full_key, value)]
        failure = [KVService.txn_op_get(self._leader_key), KVService.txn_op_get(full_key)]
        resp = await self._rpc(
            f"put {key}", lambda kv: kv.txn(compare, success, failure, max_attempts=1)
        )
        if resp.succeeded:
            return int(resp.header.revision)
        current = self._refused(key, token, resp)
        if current is not None and bytes(current.value) == value:
            return int(current.mod_revision)  # idempotent re-put: already holds these bytes
        raise self._conflict("put", key, expect_version, current)

    async def delete(self, kind: str, id: str, *, expect_version: int | None) -> None:
        key = record_key(kind, id)
        check_expect_version(key, expect_version)
        token = self._check_writer(key)
        full_key = (self.prefix + key).encode()
        compare = [self._fence(token), *_version_compare(full_key, expect_version)]
        success = [KVService.txn_op_delete(full_key)]
        failure = [KVService.txn_op_get(self._leader_key), KVService.txn_op_get(full_key)]
        resp = await self._rpc(
            f"delete {key}", lambda kv: kv.txn(compare, success, failure, max_attempts=1)
        )
        if resp.succeeded:
            return
        current = self._refused(key, token, resp)
        if current is None:
            return  # nothing to delete: a retried delete succeeds
        raise self._conflict("delete", key, expect_version, current)

    def _check_writer(self, key: str) -> int:
        self._kv()
        if self._token is None:
            raise NotLeaderError(
                f"cannot write {key}: this master has not won an election on etcd "
                f"{','.join(self.endpoints)}; {self._leader_text()}",
                leader_address=self._leader.address if self._leader else None,
            )
        if self._lost.is_set():
            # Known locally (keepalive deadline passed, key gone): refused here, even though etcd
            # may not have expired the key yet. A master that lost without knowing it is
            # refused by etcd's compare all the same.
            raise StoreFencedError(
                f"cannot write {key}: this master's leadership (token {self._token}) has ended "
                f"({self._leader_text()}); it must stop acting as leader",
                leader_address=self._leader.address if self._leader else None,
            )
        return self._token

    def _fence(self, token: int) -> Compare:
        return KVService.txn_compare_create_revision(self._leader_key, token)

    def _refused(self, key: str, token: int, resp: Any) -> Any:
        """A failed write Txn: raise StoreFencedError when the fence failed; else return the
        record as it is (None when absent)."""
        leader_kvs = resp.responses[0].response_range.kvs
        if not leader_kvs or int(leader_kvs[0].create_revision) != token:
            self._set_leader(leader_kvs[0] if leader_kvs else None)
            self._lose("a write was fenced")
            raise StoreFencedError(
                f"write of {key} refused by etcd: this master's leadership (token {token}) has "
                f"ended ({self._leader_text()}); it must stop acting as leader",
                leader_address=self._leader.address if self._leader else None,
            )
        kvs = resp.responses[1].response_range.kvs
        return kvs[0] if kvs else None

    def _conflict(
        self, op: str, key: str, expect_version: int | None, current: Any
    ) -> StoreConflictError:
        assert expect_version is not None
        actual = None if current is None else int(current.mod_revision)
        now = "does not exist" if actual is None else f"is at version {actual}"
        wanted = "not to exist" if expect_version == 0 else f"at version {expect_version}"
        return StoreConflictError(
            f"{op} {key} refused: expected it {wanted}, but it {now} in etcd (written by someone "
            "else since it was read); reload it and decide again",
            key=key,
            expected_version=expect_version,
            actual_version=actual,
        )

    # --- calls -------------------------------------------------------------------------------

    def _kv(self) -> KVService:
        client = self._client
        if client is None or client.kv is None:
            raise StoreClosedError(f"etcd store {','.join(self.endpoints)} is not open")
        return client.kv

    def _lease_api(self) -> Any:
        client = self._client
        if client is None or client.lease is None:
            raise StoreClosedError(f"etcd store {','.join(self.endpoints)} is not open")
        return client.lease

    async def _rpc(self, what: str, call: Callable[[KVService], Awaitable[T]]) -> T:
        kv = self._kv()
        where = ",".join(self.endpoints)
        try:
            async with asyncio.timeout(self._op_timeout_s):
                return await call(kv)
        except TimeoutError as exc:
            raise StoreTimeoutError(
                f"etcd {where}: {what} did not complete within {self._op_timeout_s:g} s, so its "
                "outcome is unknown (repeating a put with the same value is safe); check that "
                "etcd runs and has a quorum"
            ) from exc
        except (EtcdError, grpc.aio.AioRpcError) as exc:
            raise StoreUnavailableError(
                f"etcd {where}: {what} failed ({exc}); check that etcd runs, has a quorum and "
                "is reachable at the --store URL"
            ) from exc


def _load_page(start: bytes, end: bytes, revision: int, kv: KVService) -> Awaitable[Any]:
    return kv.get(
        start,
        end,
        revision=revision,
        limit=LOAD_PAGE_KEYS,
        sort_order=SortOrder.ASCEND,
        sort_target=SortTarget.KEY,
    )


def _version_compare(full_key: bytes, expect_version: int | None) -> list[Compare]:
    if expect_version is None:
        return []
    if expect_version == 0:
        return [KVService.txn_compare_create_revision(full_key, 0)]
    return [
        Compare(result=Compare.EQUAL, target=Compare.MOD, key=full_key, mod_revision=expect_version)
    ]


def _parse_leader(kv: Any) -> LeaderInfo:
    raw = bytes(kv.value)
    try:
        doc = (
            json.loads(raw[:LEADER_VALUE_MAX_BYTES]) if len(raw) <= LEADER_VALUE_MAX_BYTES else None
        )
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return LeaderInfo("?", "", int(kv.create_revision))
    return LeaderInfo(
        str(doc.get("master_id", "?")), str(doc.get("address", "")), int(kv.create_revision)
    )
