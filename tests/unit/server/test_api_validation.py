"""Request validation: every bad field is InvalidArgumentError naming the field."""

from __future__ import annotations

import base64

import pytest

from blockyard.engine.epoch import Role
from blockyard.engine.limits import MAX_VOLUME_SIZE_BYTES
from blockyard.errors import InvalidArgumentError, InvalidNameError, InvalidSizeError
from blockyard.scsi.alua import AccessState
from blockyard.server import convert
from blockyard.server.proto import volume_server_pb2 as pb
from blockyard.server.validation import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    check_epoch,
    check_page_size,
    check_size,
    check_snapshot_name,
    check_volume_name,
    decode_page_token,
    encode_page_token,
)


@pytest.mark.parametrize("name", ["pvc-1", "a", "A.b_c-9", "x" * 128])
def test_good_names_pass(name: str) -> None:
    assert check_volume_name("name", name) == name
    assert check_snapshot_name("name", name) == name


@pytest.mark.parametrize("name", ["-x", ".hidden", "a/b", "a b", "x" * 129, "é"])
def test_bad_names_name_the_field(name: str) -> None:
    with pytest.raises(InvalidNameError, match=r"^source\.volume: "):
        check_volume_name("source.volume", name)


def test_missing_name_says_it_is_required() -> None:
    with pytest.raises(InvalidNameError, match="name is required"):
        check_volume_name("name", "")
    with pytest.raises(InvalidNameError, match="snapshot name"):
        check_snapshot_name("name", "")


@pytest.mark.parametrize(
    ("size", "match"),
    [
        (0, "required"),
        (-4096, "required"),
        (4097, "use 8192"),
        (MAX_VOLUME_SIZE_BYTES + 4096, "maximum"),
    ],
)
def test_bad_sizes(size: int, match: str) -> None:
    with pytest.raises(InvalidSizeError, match=match) as err:
        check_size("size_bytes", size)
    assert "size_bytes" in str(err.value)


def test_size_zero_allowed_when_optional() -> None:
    assert check_size("size_bytes", 0, required=False) == 0
    assert check_size("size_bytes", 1 << 20) == 1 << 20


def test_page_size() -> None:
    assert check_page_size(0) == DEFAULT_PAGE_SIZE
    assert check_page_size(7) == 7
    assert check_page_size(MAX_PAGE_SIZE * 5) == MAX_PAGE_SIZE
    with pytest.raises(InvalidArgumentError, match="page_size"):
        check_page_size(-1)


def test_page_token_round_trip() -> None:
    assert decode_page_token("") is None
    assert decode_page_token(encode_page_token("pvc-42")) == "pvc-42"


@pytest.mark.parametrize(
    "token",
    [
        "not base64!",
        base64.urlsafe_b64encode(b"v2:pvc-1").decode(),  # unknown version
        base64.urlsafe_b64encode(b"v1:bad/name").decode(),
        base64.urlsafe_b64encode(b"v1:").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "A" * 10_000,
    ],
)
def test_foreign_page_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidArgumentError, match="page_token"):
        decode_page_token(token)


def test_epoch() -> None:
    assert check_epoch(0) == 0
    with pytest.raises(InvalidArgumentError, match="epoch"):
        check_epoch(-1)


def test_unspecified_enums_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="role is required"):
        convert.role_from_pb(pb.ROLE_UNSPECIFIED)
    with pytest.raises(InvalidArgumentError, match="state is required"):
        convert.state_from_pb(pb.PORT_STATE_UNSPECIFIED)
    with pytest.raises(InvalidArgumentError):
        convert.role_from_pb(99)


def test_enum_tables_cover_every_value() -> None:
    assert {convert.role_from_pb(convert.ROLE_TO_PB[r]) for r in Role} == set(Role)
    states = {convert.state_from_pb(convert.STATE_TO_PB[s]) for s in AccessState}
    assert states == set(AccessState)
