"""Persistent reservation state (SPC-4 §5.12) and where it is kept.

The state is a small immutable value. :class:`ReservationStore` implementations load and save
it; every successful PERSISTENT RESERVE OUT that changes state is saved before GOOD is
returned, so registrations survive reconnects, server restarts and (with a shared store)
failover. APTPL is recorded and reported, but state is persisted whatever its value: a server
restart is not a power loss of the logical unit from the initiator's point of view.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Final, Protocol

from blockyard.errors import CorruptionError, StorageIOError
from blockyard.fileutil import atomic_write

STATE_FORMAT_VERSION: Final = 1
#: Bound on registrations: each costs a key and a name; SPC-4 §5.12.7 lets us refuse more with
#: INSUFFICIENT REGISTRATION RESOURCES.
REGISTRATIONS_MAX: Final = 256
#: iSCSI names are at most 223 bytes (RFC 7143 §4.2.7.1) plus ",i,0x" and a 12-digit ISID.
PORT_NAME_BYTES_MAX: Final = 255
STATE_FILE_BYTES_MAX: Final = 1 << 20


class PrType(IntEnum):
    """SPC-4 §6.15.3 Table 169 persistent reservation TYPE codes."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8

    @property
    def all_registrants(self) -> bool:
        return self in (
            PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
            PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        )

    @property
    def registrants_only_or_all(self) -> bool:
        return self >= PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY

    @property
    def exclusive_access(self) -> bool:
        return self in (
            PrType.EXCLUSIVE_ACCESS,
            PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
            PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
        )


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered I_T nexus, or with ``all_tg_pt`` one initiator port on every target port."""

    initiator_port_name: str
    relative_target_port_id: int
    key: int
    all_tg_pt: bool = False

    def matches(self, initiator_port_name: str, relative_target_port_id: int) -> bool:
        return self.initiator_port_name == initiator_port_name and (
            self.all_tg_pt or self.relative_target_port_id == relative_target_port_id
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """The persistent reservation. For all-registrants types every registrant holds it and the
    recorded holder is only the one that created it."""

    initiator_port_name: str
    relative_target_port_id: int
    type: PrType


@dataclass(frozen=True, slots=True)
class PrState:
    generation: int = 0
    registrations: tuple[Registration, ...] = ()
    reservation: Reservation | None = None
    aptpl: bool = False

    def find(self, initiator_port_name: str, relative_target_port_id: int) -> Registration | None:
        for reg in self.registrations:
            if reg.matches(initiator_port_name, relative_target_port_id):
                return reg
        return None

    def is_holder(self, initiator_port_name: str, relative_target_port_id: int) -> bool:
        res = self.reservation
        if res is None:
            return False
        if res.type.all_registrants:
            return self.find(initiator_port_name, relative_target_port_id) is not None
        holder = self.find(res.initiator_port_name, res.relative_target_port_id)
        return holder is not None and holder.matches(initiator_port_name, relative_target_port_id)


class ReservationStore(Protocol):
    """Durable home of one logical unit's :class:`PrState`.

    ``save`` returns only once the state would survive a crash; ``load`` returns the last saved
    state (an empty one if none was ever saved) and raises ``CorruptionError`` for a damaged one.
    """

    def load(self) -> PrState: ...

    def save(self, state: PrState) -> None: ...


class MemoryReservationStore:
    """Keeps state in memory: survives reconnects, not process restarts. Thread-safe."""

    def __init__(self, state: PrState | None = None) -> None:
        self._lock = threading.Lock()
        self._state = state or PrState()
        self.save_count = 0

    def load(self) -> PrState:
        with self._lock:
            return self._state

    def save(self, state: PrState) -> None:
        with self._lock:
            self._state = state
            self.save_count += 1


def state_to_json(state: PrState) -> bytes:
    doc: dict[str, Any] = {
        "version": STATE_FORMAT_VERSION,
        "generation": state.generation,
        "aptpl": state.aptpl,
        "registrations": [
            {
                "initiator_port_name": r.initiator_port_name,
                "relative_target_port_id": r.relative_target_port_id,
                "key": r.key,
                "all_tg_pt": r.all_tg_pt,
            }
            for r in state.registrations
        ],
        "reservation": None
        if state.reservation is None
        else {
            "initiator_port_name": state.reservation.initiator_port_name,
            "relative_target_port_id": state.reservation.relative_target_port_id,
            "type": int(state.reservation.type),
        },
    }
    return json.dumps(doc, sort_keys=True).encode()


class InvalidStateError(ValueError):
    """A persisted reservation state fails validation."""


def _int(doc: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = doc.get(name)
    if type(value) is not int or not lo <= value <= hi:
        raise InvalidStateError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _name(doc: dict[str, Any]) -> str:
    value = doc.get("initiator_port_name")
    if (
        not isinstance(value, str)
        or not value
        or len(value.encode()) > PORT_NAME_BYTES_MAX
        or "\x00" in value
    ):
        raise InvalidStateError(f"initiator_port_name is invalid: {value!r}")
    return value


def state_from_json(raw: bytes) -> PrState:
    """Parse and validate; raises :class:`InvalidStateError` on anything unexpected."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidStateError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("version") != STATE_FORMAT_VERSION:
        raise InvalidStateError("missing or unknown format version")
    generation = _int(doc, "generation", 0, 0xFFFFFFFF)
    aptpl = doc.get("aptpl")
    if not isinstance(aptpl, bool):
        raise InvalidStateError("aptpl must be a boolean")
    regs_doc = doc.get("registrations")
    if not isinstance(regs_doc, list) or len(regs_doc) > REGISTRATIONS_MAX:
        raise InvalidStateError("registrations must be a list of bounded length")
    regs: list[Registration] = []
    for item in regs_doc:
        if not isinstance(item, dict):
            raise InvalidStateError("registration must be an object")
        all_tg_pt = item.get("all_tg_pt")
        if not isinstance(all_tg_pt, bool):
            raise InvalidStateError("all_tg_pt must be a boolean")
        reg = Registration(
            _name(item),
            _int(item, "relative_target_port_id", 0, 0xFFFF),
            _int(item, "key", 1, (1 << 64) - 1),
            all_tg_pt,
        )
        if any(
            r.initiator_port_name == reg.initiator_port_name
            and r.relative_target_port_id == reg.relative_target_port_id
            for r in regs
        ):
            raise InvalidStateError(f"duplicate registration for {reg.initiator_port_name}")
        regs.append(reg)
    res_doc = doc.get("reservation")
    reservation: Reservation | None = None
    if res_doc is not None:
        if not isinstance(res_doc, dict):
            raise InvalidStateError("reservation must be an object or null")
        try:
            pr_type = PrType(_int(res_doc, "type", 0, 0xF))
        except ValueError as exc:
            raise InvalidStateError(f"unknown reservation type {res_doc.get('type')!r}") from exc
        reservation = Reservation(
            _name(res_doc), _int(res_doc, "relative_target_port_id", 0, 0xFFFF), pr_type
        )
    state = PrState(generation, tuple(regs), reservation, aptpl)
    if reservation is not None and not state.is_holder(
        reservation.initiator_port_name, reservation.relative_target_port_id
    ):
        raise InvalidStateError("the reservation holder is not registered")
    return state


class FileReservationStore:
    """Keeps state in one JSON file, replaced atomically.

    ``save`` writes a temporary file in the same directory, fsyncs it, renames it over the old
    file and fsyncs the directory, so a crash leaves either the old or the new state.
    Thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str], *, volume: str) -> None:
        self._path = Path(path)
        self._volume = volume
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> PrState:
        with self._lock:
            try:
                with self._path.open("rb") as f:
                    raw = f.read(STATE_FILE_BYTES_MAX + 1)
            except FileNotFoundError:
                return PrState()
            except OSError as exc:
                raise StorageIOError(
                    f"cannot read reservation state {self._path}: {exc}; check the data directory"
                ) from exc
            if len(raw) > STATE_FILE_BYTES_MAX:
                raise CorruptionError(
                    "reservation state file is larger than any valid state",
                    volume=self._volume,
                    path=str(self._path),
                    offset=STATE_FILE_BYTES_MAX,
                )
            try:
                return state_from_json(raw)
            except InvalidStateError as exc:
                raise CorruptionError(
                    f"reservation state is invalid ({exc}); remove the file to drop all "
                    "registrations",
                    volume=self._volume,
                    path=str(self._path),
                    offset=0,
                ) from exc

    def save(self, state: PrState) -> None:
        raw = state_to_json(state)
        with self._lock:
            try:
                atomic_write(str(self._path), raw, mode=0o600)
            except (StorageIOError, OSError) as exc:
                raise StorageIOError(
                    f"cannot save reservation state to {self._path}: {exc}; check free space "
                    "and permissions of the data directory"
                ) from exc
