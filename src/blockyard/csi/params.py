"""StorageClass parameters and capacity ranges, checked before any work starts.

Parameters (``CreateVolumeRequest.parameters``; unknown keys are refused so a typo does not
silently give a different volume):

- ``fsType``: ``ext4`` or ``xfs``, the file system of ``mount`` volumes whose capability does
  not name one. A capability naming another file system conflicts and is refused.
- ``replicas``: the number of copies. On one volume server (``--backend HOST:PORT``) only
  ``1``. Through a master (``--backend master://...``) ``1`` to ``3``; left out, the master's
  default: 2 when at least two volume servers are alive, else 1.
- ``durability``: on one volume server only ``local`` (a write is acknowledged once it is
  durable on that server; see the durability contract in docs/ARCHITECTURE.md). Through a
  master ``best_effort``, ``sync_all`` or ``sync_quorum`` (docs/replication.md); left out, the
  master's default (``sync_all``).

Kubernetes' external-provisioner strips its own ``csi.storage.k8s.io/*`` keys before calling,
so they never reach this check.

CHAP secrets (the ``secrets`` of ControllerPublishVolume and NodeStageVolume, from the
Secrets the StorageClass names with ``csi.storage.k8s.io/controller-publish-secret-*`` and
``csi.storage.k8s.io/node-stage-secret-*``) use open-iscsi's key names, as Kubernetes'
``kubernetes.io/iscsi-chap`` Secret type does:

- ``node.session.auth.username`` / ``node.session.auth.password``: the initiator's CHAP
  credentials, which the target checks;
- ``node.session.auth.username_in`` / ``node.session.auth.password_in``: the target's own
  credentials for mutual CHAP, which the initiator checks.

Other keys (e.g. the ``discovery.sendtargets.auth.*`` of that Secret type) are ignored: the
driver never runs discovery. Secret values never appear in an error message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from blockyard.csi.capabilities import (
    DEFAULT_FS_TYPE,
    SUPPORTED_FS_TYPES,
    AccessType,
    Capability,
)
from blockyard.csi.errors import (
    CapacityOutOfRangeError,
    InvalidParameterError,
    UnsupportedCapabilityError,
)
from blockyard.engine.limits import BLOCK_SIZE, MAX_VOLUME_SIZE_BYTES, MIN_VOLUME_SIZE_BYTES
from blockyard.errors import InvalidArgumentError
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.errors import IscsiConfigError

PARAM_FS_TYPE: Final = "fsType"
PARAM_REPLICAS: Final = "replicas"
PARAM_DURABILITY: Final = "durability"
KNOWN_PARAMETERS: Final = (PARAM_FS_TYPE, PARAM_REPLICAS, PARAM_DURABILITY)
SINGLE_NODE_REPLICAS: Final = "1"
SINGLE_NODE_DURABILITY: Final = "local"
#: Copies of a replicated volume: a primary and up to two replicas (docs/ARCHITECTURE.md,
#: "Replication").
MAX_REPLICAS: Final = 3
REPLICATED_DURABILITIES: Final = ("best_effort", "sync_all", "sync_quorum")

#: Size of a volume created without a capacity range (the CSI spec leaves it to the plugin).
DEFAULT_VOLUME_SIZE_BYTES: Final = 1 << 30
#: Volume sizes are whole engine blocks; requests round up to this.
SIZE_GRANULARITY_BYTES: Final = BLOCK_SIZE


SECRET_CHAP_USER: Final = "node.session.auth.username"
SECRET_CHAP_PASSWORD: Final = "node.session.auth.password"
SECRET_MUTUAL_USER: Final = "node.session.auth.username_in"
SECRET_MUTUAL_PASSWORD: Final = "node.session.auth.password_in"


@dataclass(frozen=True, slots=True)
class ChapSecrets:
    """CHAP credentials from a CSI ``secrets`` map: ``chap`` the initiator's, ``mutual`` the
    target's (mutual CHAP). Both None: no CHAP."""

    chap: ChapCredentials | None = None
    mutual: ChapCredentials | None = None


def _pair(field: str, secrets: Mapping[str, str], user_key: str, password_key: str,
          what: str) -> ChapCredentials | None:  # fmt: skip
    user, password = secrets.get(user_key, ""), secrets.get(password_key, "")
    if not user and not password:
        return None
    if not user or not password:
        missing = user_key if not user else password_key
        raise InvalidArgumentError(
            f"{field}: the {what} needs both {user_key} and {password_key}; {missing} is "
            "missing or empty in the Secret"
        )
    try:
        return ChapCredentials(user, password.encode())
    except IscsiConfigError as exc:
        raise InvalidArgumentError(f"{field} ({user_key} {user[:64]!r}): {exc}") from exc


def parse_chap_secrets(field: str, secrets: Mapping[str, str]) -> ChapSecrets:
    """The CHAP credentials in ``secrets`` (keys in the module docstring). Mutual CHAP without
    initiator CHAP, or the same secret both ways, is refused (RFC 7143 §12.1.3)."""
    chap = _pair(field, secrets, SECRET_CHAP_USER, SECRET_CHAP_PASSWORD, "CHAP user")
    mutual = _pair(field, secrets, SECRET_MUTUAL_USER, SECRET_MUTUAL_PASSWORD, "mutual CHAP user")
    if mutual is not None and chap is None:
        raise InvalidArgumentError(
            f"{field}: mutual CHAP ({SECRET_MUTUAL_USER}) needs initiator CHAP "
            f"({SECRET_CHAP_USER}, {SECRET_CHAP_PASSWORD}) in the same Secret"
        )
    if chap is not None and mutual is not None and chap.secret == mutual.secret:
        raise InvalidArgumentError(
            f"{field}: {SECRET_CHAP_PASSWORD} and {SECRET_MUTUAL_PASSWORD} are the same; mutual "
            "CHAP needs two different secrets (RFC 7143 §12.1.3)"
        )
    return ChapSecrets(chap, mutual)


@dataclass(frozen=True, slots=True)
class VolumeParameters:
    """``replicas`` 0 and ``durability`` "" (replicated only): the master's defaults."""

    fs_type: str = ""
    replicas: int = 1
    durability: str = SINGLE_NODE_DURABILITY


def parse_parameters(
    field: str, params: Mapping[str, str], *, replicated: bool = False
) -> VolumeParameters:
    """``params`` checked as described in the module docstring; ``replicated``: the backend is
    a master, which takes ``replicas`` and the replicated ``durability`` modes."""
    unknown = sorted(set(params) - set(KNOWN_PARAMETERS))
    if unknown:
        raise InvalidParameterError(
            f"{field}: unknown parameter {unknown[0]!r}; blockyard takes "
            f"{', '.join(KNOWN_PARAMETERS)}"
        )
    fs_type = params.get(PARAM_FS_TYPE, "")
    if fs_type and fs_type not in SUPPORTED_FS_TYPES:
        raise InvalidParameterError(
            f"{field}.{PARAM_FS_TYPE} {fs_type!r} is not supported: use one of "
            f"{', '.join(SUPPORTED_FS_TYPES)}"
        )
    if replicated:
        return _replicated(field, params, fs_type)
    replicas = params.get(PARAM_REPLICAS, SINGLE_NODE_REPLICAS)
    if replicas != SINGLE_NODE_REPLICAS:
        raise InvalidParameterError(
            f"{field}.{PARAM_REPLICAS} {replicas!r} needs a master: this driver's volumes "
            f"live on one volume server (--backend HOST:PORT); use {SINGLE_NODE_REPLICAS!r} "
            "or leave it out, or run the controller with --backend master://HOST:PORT"
        )
    durability = params.get(PARAM_DURABILITY, SINGLE_NODE_DURABILITY)
    if durability != SINGLE_NODE_DURABILITY:
        raise InvalidParameterError(
            f"{field}.{PARAM_DURABILITY} {durability!r} needs a master: the replicated "
            f"durability modes are for volumes the master places; use "
            f"{SINGLE_NODE_DURABILITY!r} or leave it out, or run the controller with "
            "--backend master://HOST:PORT"
        )
    return VolumeParameters(fs_type=fs_type)


def _replicated(field: str, params: Mapping[str, str], fs_type: str) -> VolumeParameters:
    text = params.get(PARAM_REPLICAS, "")
    replicas = 0
    if text:
        if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
            raise InvalidParameterError(
                f"{field}.{PARAM_REPLICAS} {text[:32]!r} is not a number of copies from 1 to "
                f"{MAX_REPLICAS}; leave it out for the master's default (2 when two or more "
                "volume servers are alive, else 1)"
            )
        replicas = int(text)
    durability = params.get(PARAM_DURABILITY, "")
    if durability and durability not in REPLICATED_DURABILITIES:
        hint = (
            " (one volume server's mode; a master's volumes replicate)"
            if (durability == SINGLE_NODE_DURABILITY)
            else ""
        )
        raise InvalidParameterError(
            f"{field}.{PARAM_DURABILITY} {durability[:32]!r} is not one of "
            f"{', '.join(REPLICATED_DURABILITIES)}{hint}; leave it out for sync_all"
        )
    return VolumeParameters(fs_type=fs_type, replicas=replicas, durability=durability)


def resolve_fs_type(caps: Sequence[Capability], params: VolumeParameters) -> str:
    """The file system of the volume's ``mount`` capabilities, or ``""`` when every capability
    is ``block``. Capabilities and parameters must agree on one file system."""
    named = {c.fs_type for c in caps if c.access_type is AccessType.MOUNT and c.fs_type}
    if params.fs_type:
        named.add(params.fs_type)
    if len(named) > 1:
        raise UnsupportedCapabilityError(
            f"conflicting file systems requested ({', '.join(sorted(named))}): a volume has one "
            "file system; make the capabilities and the StorageClass fsType agree"
        )
    if not any(c.access_type is AccessType.MOUNT for c in caps):
        return ""
    return named.pop() if named else DEFAULT_FS_TYPE


def round_up(size_bytes: int) -> int:
    return -(-size_bytes // SIZE_GRANULARITY_BYTES) * SIZE_GRANULARITY_BYTES


def check_range(field: str, required_bytes: int, limit_bytes: int) -> None:
    """CSI ``CapacityRange``: neither bound negative, the limit (when set) not below the
    required size."""
    if required_bytes < 0 or limit_bytes < 0:
        raise InvalidArgumentError(
            f"{field}: required_bytes ({required_bytes}) and limit_bytes ({limit_bytes}) must "
            "not be negative (CSI CapacityRange)"
        )
    if limit_bytes and required_bytes > limit_bytes:
        raise CapacityOutOfRangeError(
            f"{field}: required_bytes {required_bytes} is above limit_bytes {limit_bytes}"
        )


def size_for_range(
    field: str, required_bytes: int, limit_bytes: int, *, floor_bytes: int = 0
) -> int:
    """The volume size for a capacity range: ``required_bytes`` rounded up to whole 4 KiB
    blocks, at least 1 MiB and at least ``floor_bytes`` (a clone's source size); without a
    required size, ``floor_bytes`` or the default size, capped at the limit. Raises
    :class:`CapacityOutOfRangeError` when the size it must pick exceeds ``limit_bytes`` or the
    largest volume."""
    check_range(field, required_bytes, limit_bytes)
    if required_bytes:
        size = round_up(required_bytes)
    elif floor_bytes:
        size = floor_bytes
    else:
        size = DEFAULT_VOLUME_SIZE_BYTES
        if limit_bytes:
            size = min(size, limit_bytes - limit_bytes % SIZE_GRANULARITY_BYTES)
    size = max(size, MIN_VOLUME_SIZE_BYTES, floor_bytes)
    if limit_bytes and size > limit_bytes:
        why = (
            f"the source is {floor_bytes} bytes"
            if floor_bytes and size == floor_bytes
            else f"volumes are whole {SIZE_GRANULARITY_BYTES}-byte blocks and at least "
            f"{MIN_VOLUME_SIZE_BYTES} bytes"
        )
        raise CapacityOutOfRangeError(
            f"{field}: the smallest volume that fits is {size} bytes ({why}), above "
            f"limit_bytes {limit_bytes}; raise the limit"
        )
    if size > MAX_VOLUME_SIZE_BYTES:
        raise CapacityOutOfRangeError(
            f"{field}: {size} bytes is larger than the largest volume "
            f"({MAX_VOLUME_SIZE_BYTES} bytes)"
        )
    return size


def size_in_range(size_bytes: int, required_bytes: int, limit_bytes: int) -> bool:
    """Whether an existing volume of ``size_bytes`` satisfies the range (idempotent create)."""
    return size_bytes >= required_bytes and (not limit_bytes or size_bytes <= limit_bytes)
