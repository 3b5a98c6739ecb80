"""The master's store: the protocol both stores implement (``sqlite://`` for one master,
``etcd://`` for several with leader election), and the types they share.

What a store keeps: opaque record values (the JSON the :mod:`blockyard.master.model` codec
writes) under a kind and an id ("servers/<id>", "volumes/<name>"). The store assigns every
write a **version**: the store's revision at that write, so versions grow strictly per key,
across a delete and a re-create too (a stale ``expect_version`` can never match a re-created
record). Both stores pass one conformance suite (tests/integration/master/
test_store_conformance.py).

Writes (contract of :meth:`MasterStore.put` and :meth:`MasterStore.delete`):

- ``expect_version=None``: unconditional. ``0``: the record must not exist. ``n``: the record
  must be at version ``n``. A mismatch raises :class:`StoreConflictError`...
- ...except an **idempotent re-put**: when the record already holds exactly the bytes being put,
  a put whose version check fails returns the record's current version without writing. A
  write whose outcome was unknown (:class:`StoreTimeoutError`, :class:`StoreUnavailableError`)
  is therefore safe to retry with the same arguments, and a create retried after a restart
  (``expect_version=0``) finds its own record and succeeds.
- Deleting a record that does not exist succeeds (retries of a delete are safe); deleting one
  at another version than ``expect_version`` raises :class:`StoreConflictError`.
- Only the leader writes. Before :meth:`MasterStore.campaign` has returned a write raises
  :class:`NotLeaderError`; once leadership is lost it raises :class:`StoreFencedError`, and
  the store itself enforces it (etcd: every write is a Txn that compares the leader key's
  create revision, the fencing token), so a deposed leader's late write never lands.
- A write is durable when the call returns (sqlite: WAL with ``synchronous=FULL``; etcd: the
  raft log of a quorum).

Every call is bounded by the store's operation timeout (:class:`StoreTimeoutError`), except
:meth:`MasterStore.campaign`, whose wait for leadership is as long as its ``timeout_s`` says;
each step inside it is bounded, and cancelling it leaves the store as it was.

Thread-safety: a store belongs to one event loop; its methods are called from that loop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from blockyard.errors import InvalidArgumentError

#: The kinds the master keeps. A store accepts any kind matching :data:`KIND_RE`; these are the
#: ones the master writes.
KIND_SERVERS: Final = "servers"
KIND_VOLUMES: Final = "volumes"

#: A kind: lowercase, no "/" (keys are "<kind>/<id>").
KIND_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
#: An id: a server id or a volume name (engine names are ``[A-Za-z0-9][A-Za-z0-9._-]*``); no
#: "/" so one kind's ids never reach into another kind's keys.
ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")
#: Largest record value a store takes. etcd refuses requests over 1.5 MiB by default
#: (``--max-request-bytes``); the model's own cap (model.MAX_RECORD_BYTES) is below this.
MAX_VALUE_BYTES: Final = 1024 * 1024

#: Default bound on one store call (one sqlite transaction, one etcd round trip).
DEFAULT_OP_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who leads: for redirects (``address``) and for logs (``token``)."""

    master_id: str
    address: str
    #: The fencing token of this leadership: etcd: the leader key's create revision; sqlite: a
    #: term counter bumped by every campaign. Grows with every new leadership.
    token: int


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as stored: its value bytes and the version the store gave its last write."""

    value: bytes
    version: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every record of the store, read at one revision (a consistent cut)."""

    #: kind -> id -> record.
    records: Mapping[str, Mapping[str, StoredRecord]] = field(default_factory=dict)
    #: The store's revision the snapshot was read at (every version in it is <= this).
    revision: int = 0

    def of(self, kind: str) -> Mapping[str, StoredRecord]:
        """The records of one kind (empty when there are none)."""
        return self.records.get(kind, {})

    @property
    def servers(self) -> Mapping[str, StoredRecord]:
        return self.of(KIND_SERVERS)

    @property
    def volumes(self) -> Mapping[str, StoredRecord]:
        return self.of(KIND_VOLUMES)


@runtime_checkable
class MasterStore(Protocol):
    """The master's durable state and its leadership. See the module docstring for the write
    contract."""

    async def open(self) -> None:
        """Connect / open the database. sqlite: takes the database's exclusive lock, so a
        second master on the same file fails here with :class:`StoreLockedError`. A failed
        open leaves nothing held; open may be called again."""

    async def close(self) -> None:
        """Release everything (etcd: revokes this master's lease, so a follower takes over at
        once). Idempotent; bounded."""

    async def campaign(
        self, master_id: str, address: str, *, timeout_s: float | None = None
    ) -> None:
        """Return once this master is the leader (sqlite: at once). ``timeout_s=None`` waits
        until leadership comes or the call is cancelled (a follower's wait is legitimately
        open-ended); otherwise :class:`StoreTimeoutError` after ``timeout_s``. Winning again
        after a loss gives a new :attr:`leadership_lost` event; campaigning while leading
        returns at once and keeps the event (its waiters still hear of a later loss)."""

    def leader(self) -> LeaderInfo | None:
        """The current leader as last seen (etcd: kept current by a watch), or None."""

    @property
    def is_leader(self) -> bool:
        """True from a won campaign until leadership is lost or the store closes."""

    @property
    def leadership_lost(self) -> asyncio.Event:
        """Set when this master stops being the leader (etcd: its lease could not be kept
        alive, or the leader key was deleted or replaced; sqlite: the lock file was replaced
        under it, or close). Each won campaign makes a new, clear event."""

    async def load(self) -> Snapshot:
        """Every record, with versions, read at one revision. Followers may load too."""

    async def put(self, kind: str, id: str, value: bytes, *, expect_version: int | None) -> int:
        """Write one record; return its new version (or, for an idempotent re-put, its current
        one). Raises StoreConflictError, NotLeaderError, StoreFencedError, StoreTimeoutError,
        StoreUnavailableError."""

    async def delete(self, kind: str, id: str, *, expect_version: int | None) -> None:
        """Delete one record (absent: nothing to do). Raises as :meth:`put`."""


def record_key(kind: str, id: str) -> str:
    """``<kind>/<id>`` after checking both, so a bad name fails the same way in every store."""
    if not KIND_RE.fullmatch(kind):
        raise InvalidArgumentError(
            f"store record kind {kind!r} is not valid: use 1-32 characters from a-z, 0-9, "
            "'_' and '-', starting with a letter"
        )
    if not ID_RE.fullmatch(id):
        raise InvalidArgumentError(
            f"store record id {id!r} (kind {kind}) is not valid: use 1-253 characters from "
            "A-Z, a-z, 0-9, '.', '_', ':' and '-', starting with a letter or digit"
        )
    return f"{kind}/{id}"


def check_value(key: str, value: bytes) -> None:
    """Refuse a value over :data:`MAX_VALUE_BYTES` (etcd would refuse the request anyway)."""
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgumentError(
            f"store record {key} is {len(value)} bytes, over the {MAX_VALUE_BYTES}-byte limit "
            "of one record; split the record or keep less in it"
        )


def check_expect_version(key: str, expect_version: int | None) -> None:
    if expect_version is not None and expect_version < 0:
        raise InvalidArgumentError(
            f"expect_version {expect_version} for store record {key} is negative: pass None "
            "(unconditional), 0 (must not exist) or the version load()/put() returned"
        )
