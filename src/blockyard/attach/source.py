"""Where an attach daemon gets its blocks: a source spec, and opening it as a BlockDevice.

Spec strings (what ``blockyard attach`` and the CSI node plugin pass down)::

    local:DATA_DIR/NAME                         an engine volume in a local data directory
    iscsi:IQN@HOST:PORT[,HOST:PORT...][/LUN]    a LUN behind one or more portals (multipath)

Specs are also carried as JSON dicts (in the daemon's argv and in the state file); the canonical
string of a spec is what the attachment id is derived from, so the same source always maps to
the same attachment and a retried attach finds the first one.

Adding a kind of source is one dataclass here plus one branch in :func:`open_source`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockyard.attach.errors import SourceUnavailableError
from blockyard.blockdev import BlockDevice
from blockyard.engine import VolumeStore
from blockyard.errors import InvalidArgumentError
from blockyard.iscsi.chap import ChapCredentials

#: RFC 7143 §4.2.7.1: an iSCSI name is at most 223 bytes.
ISCSI_NAME_MAX_BYTES = 223
#: Multipath sessions span at most this many portals.
PORTALS_MAX_COUNT = 8
#: SAM-5 flat space addressing: LUNs up to 16383.
LUN_MAX = 16383
_ADDR_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
_IQN_RE = re.compile(
    r"^(iqn\.\d{4}-\d{2}\.[^\s,@/]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$"
)
OPEN_ISCSI_NAME_FILE = "/etc/iscsi/initiatorname.iscsi"
DEFAULT_INITIATOR_PREFIX = "iqn.2024-01.io.blockyard:node."
#: The module that provides IscsiBlockDevice once the userspace initiator lands.
INITIATOR_MODULE = "blockyard.attach.initiator"


def check_address(text: str) -> str:
    m = _ADDR_RE.match(text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise InvalidArgumentError(f"bad address {text!r}: use HOST:PORT, e.g. 10.0.0.5:3260")
    return text


@dataclass(frozen=True, slots=True)
class LocalSource:
    """An engine volume opened directly (the daemon takes the volume file's lock)."""

    data_dir: str
    name: str

    @property
    def volume(self) -> str:
        return self.name

    def canonical(self) -> str:
        return f"local:{os.path.abspath(self.data_dir)}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "local", "data_dir": os.path.abspath(self.data_dir), "name": self.name}


@dataclass(frozen=True, slots=True)
class IscsiSource:
    """A LUN behind one or more portals of the same target (one multipath session).

    ``chap``/``target_chap`` (one-way or mutual CHAP) are deliberately left out of
    :meth:`canonical` and :meth:`to_dict`: those end up in the attachment id, the daemon's argv
    and its state file. The caller hands them to the daemon in a 0600 file instead
    (:func:`blockyard.attach.state.write_credentials`); ``repr`` shows no secret.
    """

    portals: tuple[str, ...]
    iqn: str
    lun: int = 0
    #: The volume name, for listings; empty when only the target is known.
    volume_name: str = ""
    #: This node's IQN; empty means :func:`default_initiator_name`.
    initiator_name: str = ""
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.portals) <= PORTALS_MAX_COUNT:
            raise InvalidArgumentError(
                f"give 1 to {PORTALS_MAX_COUNT} portals (HOST:PORT), got {len(self.portals)}"
            )
        for p in self.portals:
            check_address(p)
        if len(self.iqn.encode()) > ISCSI_NAME_MAX_BYTES or not _IQN_RE.match(self.iqn):
            raise InvalidArgumentError(
                f"bad iSCSI target name {self.iqn!r}: use iqn.YYYY-MM.reverse.domain:name "
                "(RFC 7143 §4.2.7), at most 223 bytes"
            )
        if not 0 <= self.lun <= LUN_MAX:
            raise InvalidArgumentError(f"LUN {self.lun} is out of range 0-{LUN_MAX}")

    @property
    def volume(self) -> str:
        return self.volume_name or self.iqn.rsplit(":", 1)[-1]

    def canonical(self) -> str:
        # Portal order does not change which LUN this is.
        return f"iscsi:{self.iqn}@{','.join(sorted(self.portals))}/{self.lun}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "iscsi",
            "portals": list(self.portals),
            "iqn": self.iqn,
            "lun": self.lun,
            "volume_name": self.volume_name,
            "initiator_name": self.initiator_name,
        }


SourceSpec = LocalSource | IscsiSource


def parse_source(text: str) -> SourceSpec:
    """Parse a spec string (see the module docstring); raises InvalidArgumentError."""
    kind, sep, rest = text.partition(":")
    if kind == "local" and sep:
        data_dir, _, name = rest.rstrip("/").rpartition("/")
        if not data_dir or not name:
            raise InvalidArgumentError(f"bad local source {text!r}: use local:DATA_DIR/NAME")
        return LocalSource(data_dir=data_dir, name=name)
    if kind == "iscsi" and sep:
        iqn, at, addrs = rest.rpartition("@")
        lun = 0
        if "/" in addrs:
            addrs, _, lun_text = addrs.partition("/")
            if not lun_text.isdigit():
                raise InvalidArgumentError(f"bad LUN in {text!r}")
            lun = int(lun_text)
        if not at:
            raise InvalidArgumentError(f"bad iscsi source {text!r}: use iscsi:IQN@HOST:PORT[/LUN]")
        return IscsiSource(portals=tuple(addrs.split(",")), iqn=iqn, lun=lun)
    raise InvalidArgumentError(
        f"unknown source {text!r}: use local:DATA_DIR/NAME or iscsi:IQN@HOST:PORT[,HOST:PORT]"
    )


def source_from_dict(raw: dict[str, Any]) -> SourceSpec:
    try:
        if raw["kind"] == "local":
            return LocalSource(data_dir=str(raw["data_dir"]), name=str(raw["name"]))
        if raw["kind"] == "iscsi":
            return IscsiSource(
                portals=tuple(str(p) for p in raw["portals"]),
                iqn=str(raw["iqn"]),
                lun=int(raw.get("lun", 0)),
                volume_name=str(raw.get("volume_name", "")),
                initiator_name=str(raw.get("initiator_name", "")),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"bad source spec {raw!r}: {exc}") from exc
    raise InvalidArgumentError(f"unknown source kind {raw.get('kind')!r}")


def default_initiator_name() -> str:
    """This node's IQN: open-iscsi's if configured, else one derived from the host name."""
    with contextlib.suppress(OSError), open(OPEN_ISCSI_NAME_FILE) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            if key == "InitiatorName" and _IQN_RE.match(value):
                return value
    host = re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().lower()) or "node"
    return f"{DEFAULT_INITIATOR_PREFIX}{host}"[:ISCSI_NAME_MAX_BYTES]


def _iscsi_device_class() -> Any:
    """The initiator's IscsiBlockDevice, or SourceUnavailableError if it is not there yet."""
    try:
        module = importlib.import_module(INITIATOR_MODULE)
    except ImportError as exc:
        raise SourceUnavailableError(
            f"the userspace iSCSI initiator ({INITIATOR_MODULE}) cannot be imported: {exc}"
        ) from exc
    cls = getattr(module, "IscsiBlockDevice", None)
    if cls is None:
        raise SourceUnavailableError(
            "attaching over iSCSI is not available yet: this build's userspace initiator "
            f"({INITIATOR_MODULE}) does not provide IscsiBlockDevice; use --local DATA_DIR/NAME "
            "on the volume server's machine instead"
        )
    return cls


def check_available(spec: SourceSpec) -> None:
    """Fail early (before a daemon is spawned) if this build cannot open ``spec``."""
    if isinstance(spec, IscsiSource):
        _iscsi_device_class()


@dataclass(slots=True)
class OpenedSource:
    device: BlockDevice
    close: Callable[[], None]


def open_source(spec: SourceSpec) -> OpenedSource:
    """Open ``spec`` as a thread-safe BlockDevice; ``close`` releases it (flushing first)."""
    if isinstance(spec, LocalSource):
        vol = VolumeStore(spec.data_dir).open(spec.name)
        return OpenedSource(device=vol, close=vol.close)
    cls = _iscsi_device_class()
    device = cls.connect(
        list(spec.portals),
        spec.iqn,
        spec.initiator_name or default_initiator_name(),
        lun=spec.lun,
        chap=spec.chap,
        target_chap=spec.target_chap,
    )
    return OpenedSource(device=device, close=device.close)
