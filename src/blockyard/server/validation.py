"""Checks for management requests, each naming the offending field and how to fix it.

Every check raises an :class:`~blockyard.errors.InvalidArgumentError` subclass (so gRPC callers
get INVALID_ARGUMENT) before any work starts. Page tokens are opaque to callers: a version tag
plus the last name of the previous page, base64url-encoded.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

from blockyard.engine.limits import BLOCK_SIZE, MAX_VOLUME_SIZE_BYTES, NAME_MAX_CHARS
from blockyard.engine.names import check_name
from blockyard.errors import InvalidArgumentError, InvalidNameError, InvalidSizeError

#: Volumes per ListVolumes page when the caller asks for 0, and the most it may get.
DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
#: Longest page token accepted; a valid one is far shorter (base64 of the tag and one name).
MAX_PAGE_TOKEN_CHARS: Final = 4 * ((len("v1:") + NAME_MAX_CHARS + 2) // 3) + 4
_TOKEN_TAG: Final = "v1:"


def check_volume_name(field: str, value: str) -> str:
    """``value`` as a volume name, or InvalidNameError naming ``field``."""
    return _check(field, value, "volume")


def check_snapshot_name(field: str, value: str) -> str:
    return _check(field, value, "snapshot")


def _check(field: str, value: str, what: str) -> str:
    if not value:
        raise InvalidNameError(f"{field} is required: give the {what} name")
    try:
        return check_name(value, what=what)
    except InvalidNameError as exc:
        raise InvalidNameError(f"{field}: {exc}") from exc


def check_size(field: str, size_bytes: int, *, required: bool = True) -> int:
    """``size_bytes`` as a volume size: positive (or 0 when not ``required``), a multiple of
    the engine block size, at most the maximum volume size. The engine checks the minimum."""
    if size_bytes == 0 and not required:
        return 0
    if size_bytes <= 0:
        raise InvalidSizeError(f"{field} is required: give the size in bytes (> 0)")
    if size_bytes > MAX_VOLUME_SIZE_BYTES:
        raise InvalidSizeError(
            f"{field} {size_bytes} is larger than the maximum volume size "
            f"{MAX_VOLUME_SIZE_BYTES} bytes"
        )
    if size_bytes % BLOCK_SIZE:
        rounded = -(-size_bytes // BLOCK_SIZE) * BLOCK_SIZE
        raise InvalidSizeError(
            f"{field} {size_bytes} is not a multiple of {BLOCK_SIZE} bytes; use {rounded}"
        )
    return size_bytes


def check_page_size(page_size: int) -> int:
    """The effective page size: the default for 0, clamped to the maximum."""
    if page_size < 0:
        raise InvalidArgumentError(
            f"page_size {page_size} is negative: use 0 for the default ({DEFAULT_PAGE_SIZE}) "
            f"or up to {MAX_PAGE_SIZE}"
        )
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def encode_page_token(last_name: str) -> str:
    return base64.urlsafe_b64encode((_TOKEN_TAG + last_name).encode()).decode()


def decode_page_token(token: str) -> str | None:
    """The last name of the previous page, or None for the first page (empty token)."""
    if not token:
        return None
    bad = InvalidArgumentError(
        f"page_token {token[:64]!r} is not a token this server issued: pass the "
        "next_page_token of the previous ListVolumes answer unchanged, or empty to start over"
    )
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise bad
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise bad from exc
    if not text.startswith(_TOKEN_TAG):
        raise bad
    name = text[len(_TOKEN_TAG) :]
    try:
        check_name(name)
    except InvalidNameError as exc:
        raise bad from exc
    return name


def check_epoch(epoch: int) -> int:
    if epoch < 0:
        raise InvalidArgumentError(f"epoch {epoch} is negative: epochs count up from 0")
    return epoch
