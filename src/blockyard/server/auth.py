"""Who may log in to a volume's iSCSI target: CHAP, mutual CHAP and the initiator ACL.

:class:`VolumeAuth` is the value; :func:`load_auth` and :func:`save_auth` keep it in
``<volume dir>/auth.json`` so a restarted server enforces the same rules. The file is created
with mode 0600 (it holds the CHAP secrets in clear: CHAP-MD5 needs them, RFC 1994 §4.1),
replaced atomically (temporary file, fsync, rename, fsync of the directory) and removed with
the volume, so a later volume of the same name starts with nothing of it.

A damaged or unreadable file fails closed: the volume is not served (``CorruptionError``)
rather than served to everyone. Secrets never appear in a ``repr``, a log line or an error
message (:class:`~blockyard.iscsi.chap.ChapCredentials` redacts its own ``repr``).

Semantics:

- ``chap`` set: every login must pass CHAP with these credentials; ``mutual_chap`` set too:
  initiators that ask may also authenticate the target (RFC 7143 §12.1.3).
- ``allowed_initiators`` None: any initiator name may log in ("open"). A set, even an empty
  one: only those names ("restricted"; empty admits nobody). The ACL fences by name; CHAP is
  what authenticates.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any, Final

from blockyard.errors import (
    CorruptionError,
    InvalidArgumentError,
    NoSpaceError,
    StorageIOError,
)
from blockyard.fileutil import atomic_write, fsync_dir
from blockyard.iscsi.chap import ChapCredentials, check_mutual_pair
from blockyard.iscsi.discovery import MAX_NAME_LENGTH, is_valid_iscsi_name
from blockyard.iscsi.errors import IscsiConfigError
from blockyard.server.backend import AccessInfo

AUTH_FILE: Final = "auth.json"
AUTH_FORMAT_VERSION: Final = 1
#: Initiators one volume may admit. CSI needs two (both ends of a live migration); the rest
#: is room for hand-made ACLs. Bounds the file and every login's lookup.
MAX_ALLOWED_INITIATORS: Final = 64
#: A valid file is far smaller (two credentials and the ACL); larger is not ours.
AUTH_FILE_BYTES_MAX: Final = 64 << 10
_TMP_PREFIX: Final = f".{AUTH_FILE}."


def check_initiator_name(field: str, name: str) -> str:
    """``name`` as an initiator IQN/EUI/NAA name (RFC 7143 §4.2.7), or InvalidArgumentError."""
    if not name:
        raise InvalidArgumentError(f"{field} is required: give the initiator's iSCSI name")
    if len(name.encode()) > MAX_NAME_LENGTH or not is_valid_iscsi_name(name):
        raise InvalidArgumentError(
            f"{field} {name[:64]!r} is not a valid iSCSI name (RFC 7143 §4.2.7: e.g. "
            "iqn.2024-01.com.example:node1, lower case, at most 223 bytes)"
        )
    return name


@dataclass(frozen=True, slots=True)
class VolumeAuth:
    """One volume's login rules; see the module docstring. Immutable; validated on creation
    (raises :class:`~blockyard.errors.InvalidArgumentError` subclasses)."""

    chap: ChapCredentials | None = None
    mutual_chap: ChapCredentials | None = None
    allowed_initiators: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.mutual_chap is not None and self.chap is None:
            raise IscsiConfigError(
                "mutual CHAP needs initiator CHAP credentials too: set both, or neither"
            )
        if self.chap is not None:
            check_mutual_pair(self.chap, self.mutual_chap)
        if self.allowed_initiators is not None:
            if len(self.allowed_initiators) > MAX_ALLOWED_INITIATORS:
                raise InvalidArgumentError(
                    f"a volume admits at most {MAX_ALLOWED_INITIATORS} initiators, not "
                    f"{len(self.allowed_initiators)}; remove some first"
                )
            for name in self.allowed_initiators:
                check_initiator_name("allowed initiator", name)

    @property
    def restricted(self) -> bool:
        return self.allowed_initiators is not None

    def admits(self, initiator_name: str) -> bool:
        """Whether an initiator of this name may log in (CHAP still applies)."""
        return self.allowed_initiators is None or initiator_name in self.allowed_initiators

    def with_chap(
        self, chap: ChapCredentials | None, mutual_chap: ChapCredentials | None
    ) -> VolumeAuth:
        return replace(self, chap=chap, mutual_chap=mutual_chap)

    def with_access(self, allowed: Collection[str] | None) -> VolumeAuth:
        return replace(self, allowed_initiators=None if allowed is None else frozenset(allowed))

    def allowing(self, initiator_name: str) -> VolumeAuth:
        """Restricted to the current ACL plus ``initiator_name`` (an open volume becomes
        restricted to that one initiator)."""
        current = self.allowed_initiators or frozenset()
        return replace(self, allowed_initiators=current | {initiator_name})

    def revoking(self, initiator_name: str) -> VolumeAuth:
        """Restricted to the current ACL less ``initiator_name`` (an open volume becomes
        restricted to nobody: "everyone but X" is not expressible, and fencing X must hold)."""
        current = self.allowed_initiators or frozenset()
        return replace(self, allowed_initiators=current - {initiator_name})

    def info(self) -> AccessInfo:
        """The summary callers see; never the secrets."""
        return AccessInfo(
            chap_user=self.chap.name if self.chap is not None else "",
            mutual_chap_user=self.mutual_chap.name if self.mutual_chap is not None else "",
            restricted=self.restricted,
            allowed_initiators=tuple(sorted(self.allowed_initiators or ())),
        )


OPEN: Final = VolumeAuth()


def credentials(field: str, user: str, secret: bytes) -> ChapCredentials | None:
    """CHAP credentials from a user name and secret; both empty means none."""
    if not user and not secret:
        return None
    if not user or not secret:
        raise InvalidArgumentError(
            f"{field}: give both the CHAP user name and the secret (or neither to turn it off)"
        )
    try:
        return ChapCredentials(user, secret)
    except IscsiConfigError as exc:
        raise IscsiConfigError(f"{field}: {exc}") from exc


# ---- the file -------------------------------------------------------------------------------


def _chap_to_json(chap: ChapCredentials | None) -> dict[str, str] | None:
    if chap is None:
        return None
    return {"user": chap.name, "secret": base64.b64encode(chap.secret).decode("ascii")}


def _chap_from_json(raw: object) -> ChapCredentials | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError("a CHAP entry must be an object")
    user, secret = raw.get("user"), raw.get("secret")
    if not isinstance(user, str) or not isinstance(secret, str):
        raise TypeError("a CHAP entry needs string user and secret")
    return ChapCredentials(user, base64.b64decode(secret.encode("ascii"), validate=True))


def encode(auth: VolumeAuth) -> bytes:
    allowed = auth.allowed_initiators
    doc: dict[str, Any] = {
        "version": AUTH_FORMAT_VERSION,
        "chap": _chap_to_json(auth.chap),
        "mutual_chap": _chap_to_json(auth.mutual_chap),
        "allowed_initiators": None if allowed is None else sorted(allowed),
    }
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def decode(data: bytes) -> VolumeAuth:
    """Parse a file's bytes; raises ValueError, TypeError or InvalidArgumentError when malformed."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("version") != AUTH_FORMAT_VERSION:
        raise ValueError(
            f"unknown format version {doc.get('version') if isinstance(doc, dict) else None!r}"
        )
    allowed = doc.get("allowed_initiators")
    if allowed is not None and (
        not isinstance(allowed, list) or not all(isinstance(n, str) for n in allowed)
    ):
        raise ValueError("allowed_initiators must be null or a list of names")
    return VolumeAuth(
        chap=_chap_from_json(doc.get("chap")),
        mutual_chap=_chap_from_json(doc.get("mutual_chap")),
        allowed_initiators=None if allowed is None else frozenset(allowed),
    )


def load_auth(directory: str, volume: str) -> VolumeAuth:
    """The rules saved for the volume in ``directory`` (open when there is no file). Leftover
    temporary files of an interrupted save are removed. Raises CorruptionError for a file that
    cannot be trusted, StorageIOError when it cannot be read."""
    path = os.path.join(directory, AUTH_FILE)
    for entry in os.listdir(directory):
        if entry.startswith(_TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, entry))
    try:
        with open(path, "rb") as f:
            data = f.read(AUTH_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        return OPEN
    except OSError as exc:
        raise StorageIOError(
            f"cannot read {path} ({exc.strerror}); fix its permissions or restore it"
        ) from exc
    if len(data) > AUTH_FILE_BYTES_MAX:
        raise CorruptionError(
            f"access settings file is larger than {AUTH_FILE_BYTES_MAX} bytes; the volume is "
            "not served until it is fixed or removed (removing it opens the volume to every "
            "initiator)",
            volume=volume,
            path=path,
            offset=0,
        )
    try:
        return decode(data)
    except (ValueError, TypeError, binascii.Error, InvalidArgumentError) as exc:
        raise CorruptionError(
            f"access settings file is damaged ({type(exc).__name__}); the volume is not served "
            "until it is fixed or removed (removing it opens the volume to every initiator)",
            volume=volume,
            path=path,
            offset=0,
        ) from exc


def save_auth(directory: str, auth: VolumeAuth) -> None:
    """Persist ``auth`` atomically (mode 0600); durable on return. Saving the open default
    removes the file."""
    path = os.path.join(directory, AUTH_FILE)
    try:
        if auth == OPEN:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fsync_dir(directory)
        else:
            # 0600 from the first byte, so the secrets are never readable by others.
            atomic_write(path, encode(auth), mode=0o600)
    except NoSpaceError as exc:
        raise NoSpaceError(
            f"no space left to save the access settings in {directory}; free space and "
            "retry (nothing changed for new logins)"
        ) from exc
    except (OSError, StorageIOError) as exc:
        raise StorageIOError(
            f"cannot save the access settings in {directory} ({exc}); nothing changed "
            "for new logins. Check the data directory and retry"
        ) from exc
