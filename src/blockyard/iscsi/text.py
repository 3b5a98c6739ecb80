"""key=value text of Login and Text PDUs (RFC 7143 §6.1), with bounds and C-bit reassembly.

A data segment is a run of ``key=value`` pairs, each ended by a NUL byte (RFC 7143 §6.1). Keys
are at most 63 bytes of letters, digits and ``. - + @ _``; values are UTF-8 text of at most 255
bytes, except the CHAP binary values, which may be as long as their 1024-byte binary limit in
hex (RFC 7143 §12.1.3). Pairs are returned in order, duplicates included, because whether a
duplicate is an error depends on the key (SendTargets answers repeat TargetName).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from blockyard.blockdev import BytesLike
from blockyard.iscsi.errors import LocalProtocolError, RejectReason, TextFormatError

MAX_KEY_LENGTH = 63  # RFC 7143 §6.1: "key names MUST NOT exceed 63 bytes"
MAX_VALUE_LENGTH = 255  # RFC 7143 §6.1: default maximum length of a simple-value
MAX_CHAP_BINARY_LENGTH = 1024  # RFC 7143 §12.1.3: CHAP_C / CHAP_R binary limit
#: "0x" plus two hex digits per byte: the longest text form of a 1024-byte CHAP value.
MAX_LARGE_VALUE_LENGTH = 2 + 2 * MAX_CHAP_BINARY_LENGTH
#: Keys whose values may be longer than MAX_VALUE_LENGTH (RFC 7143 §12.1.3).
LARGE_VALUE_KEYS = frozenset({"CHAP_C", "CHAP_R"})
#: RFC 7143 §6.1 asks every implementation to take at least 8192 bytes of text in one
#: negotiation sequence; 64 KiB is a generous bound that still caps memory per connection.
DEFAULT_MAX_TEXT_LENGTH = 65536

_KEY_RE = re.compile(r"[A-Za-z0-9.\-+@_]{1,63}")  # RFC 7143 §6.1 key-name characters

TextPairs = list[tuple[str, str]]


def _error(message: str) -> TextFormatError:
    return TextFormatError(message, reject_reason=RejectReason.PROTOCOL_ERROR)


def _max_value_length(key: str) -> int:
    return MAX_LARGE_VALUE_LENGTH if key in LARGE_VALUE_KEYS else MAX_VALUE_LENGTH


def parse_text(segment: BytesLike) -> TextPairs:
    """Parse a complete text segment into ``(key, value)`` pairs, in order.

    Raises :class:`TextFormatError` on a missing terminator, a pair without ``=``, a bad key,
    a non-UTF-8 value, or a key or value over its length bound.
    """
    raw = bytes(segment)
    if not raw:
        return []
    if raw[-1] != 0:
        raise _error("text does not end with a NUL terminator (RFC 7143 §6.1)")
    pairs: TextPairs = []
    for item in raw[:-1].split(b"\x00"):
        key_bytes, sep, value_bytes = item.partition(b"=")
        if not sep:
            raise _error(f"text item {item[:MAX_KEY_LENGTH]!r} has no '=' (RFC 7143 §6.1)")
        if len(key_bytes) > MAX_KEY_LENGTH:
            raise _error(f"key of {len(key_bytes)} bytes exceeds {MAX_KEY_LENGTH} (RFC 7143 §6.1)")
        try:
            key = key_bytes.decode("ascii")
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _error(f"text item is not valid UTF-8: {exc}") from exc
        if not _KEY_RE.fullmatch(key):
            raise _error(f"key {key!r} has characters outside RFC 7143 §6.1")
        if len(value_bytes) > _max_value_length(key):
            raise _error(
                f"value of {key} is {len(value_bytes)} bytes, over {_max_value_length(key)} "
                "(RFC 7143 §6.1)"
            )
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as ``key=value\\0`` items. Raises :class:`LocalProtocolError` on bad input."""
    out = bytearray()
    for key, value in pairs:
        if not _KEY_RE.fullmatch(key):
            raise LocalProtocolError(f"key {key!r} is not a valid RFC 7143 §6.1 key name")
        value_bytes = value.encode("utf-8")
        if b"\x00" in value_bytes:
            raise LocalProtocolError(f"value of {key} contains a NUL byte")
        if len(value_bytes) > _max_value_length(key):
            raise LocalProtocolError(
                f"value of {key} is {len(value_bytes)} bytes, over {_max_value_length(key)}"
            )
        out += key.encode("ascii")
        out += b"="
        out += value_bytes
        out += b"\x00"
    return bytes(out)


def pairs_to_dict(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Index pairs by key, refusing a key that appears twice (RFC 7143 §6.2: a key is
    offered at most once per negotiation)."""
    result: dict[str, str] = {}
    for key, value in pairs:
        if key in result:
            raise _error(f"key {key} appears more than once (RFC 7143 §6.2)")
        result[key] = value
    return result


class TextAssembler:
    """Joins the data segments of a C-bit continued Login or Text sequence (RFC 7143 §6.1).

    ``add`` returns None while more segments are expected (C=1) and the whole text once the
    last one (C=0) arrives; the total is bounded by ``max_length``.
    """

    __slots__ = ("_buffer", "_max_length")

    def __init__(self, max_length: int = DEFAULT_MAX_TEXT_LENGTH) -> None:
        self._buffer = bytearray()
        self._max_length = max_length

    @property
    def pending(self) -> bool:
        """True while a continued sequence is incomplete."""
        return bool(self._buffer)

    def add(self, segment: BytesLike, *, cont: bool) -> bytes | None:
        if len(self._buffer) + len(segment) > self._max_length:
            self._buffer.clear()
            raise _error(f"continued text exceeds {self._max_length} bytes")
        self._buffer += segment
        if cont:
            return None
        text = bytes(self._buffer)
        self._buffer.clear()
        return text


def split_text(text: bytes, max_segment_length: int) -> list[bytes]:
    """Split encoded text into data segments of at most ``max_segment_length`` bytes; every
    segment but the last is sent with C=1 (RFC 7143 §6.1 lets a pair span PDUs)."""
    if max_segment_length <= 0:
        raise LocalProtocolError("max_segment_length must be positive")
    if not text:
        return [b""]
    return [text[i : i + max_segment_length] for i in range(0, len(text), max_segment_length)]
