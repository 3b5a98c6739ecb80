"""key=value text: parsing, bounds, continuation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockyard.iscsi.errors import LocalProtocolError, TextFormatError
from blockyard.iscsi.text import (
    MAX_KEY_LENGTH,
    TextAssembler,
    encode_text,
    pairs_to_dict,
    parse_text,
    split_text,
)

KEYS = st.text(alphabet="abcXYZ019.-+@_", min_size=1, max_size=MAX_KEY_LENGTH)
VALUES = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]), max_size=60
)


@given(st.lists(st.tuples(KEYS, VALUES), max_size=8))
def test_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert parse_text(encode_text(pairs)) == pairs


def test_parse_keeps_order_and_equals_in_values() -> None:
    assert parse_text(b"A=1\x00TargetAddress=h:3260,1\x00X=a=b\x00") == [
        ("A", "1"),
        ("TargetAddress", "h:3260,1"),
        ("X", "a=b"),
    ]
    assert parse_text(b"") == []


@pytest.mark.parametrize(
    "raw",
    [
        b"A=1",  # no terminator
        b"A1\x00",  # no '='
        b"=1\x00",  # empty key
        b"A B=1\x00",  # bad key character
        b"K" * 64 + b"=1\x00",  # key too long
        b"A=" + b"v" * 256 + b"\x00",  # value too long
        b"A=\xff\x00",  # not UTF-8
    ],
)
def test_parse_rejects(raw: bytes) -> None:
    with pytest.raises(TextFormatError):
        parse_text(raw)


def test_chap_values_may_be_long() -> None:
    value = "0x" + "ab" * 1024
    assert parse_text(encode_text([("CHAP_C", value)])) == [("CHAP_C", value)]
    with pytest.raises(TextFormatError):
        parse_text(b"CHAP_C=0x" + b"ab" * 1025 + b"\x00")


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(LocalProtocolError):
        encode_text([("bad key", "1")])
    with pytest.raises(LocalProtocolError):
        encode_text([("A", "x\x00y")])


def test_duplicates_refused_by_pairs_to_dict() -> None:
    with pytest.raises(TextFormatError):
        pairs_to_dict([("A", "1"), ("A", "2")])


@given(st.binary(max_size=300), st.integers(1, 64))
def test_split_and_reassemble(text: bytes, segment: int) -> None:
    parts = split_text(text, segment)
    assembler = TextAssembler()
    results = [assembler.add(part, cont=i < len(parts) - 1) for i, part in enumerate(parts)]
    assert results[:-1] == [None] * (len(parts) - 1)
    assert results[-1] == text
    assert not assembler.pending


def test_assembler_bound() -> None:
    assembler = TextAssembler(max_length=100)
    assembler.add(b"x" * 60, cont=True)
    with pytest.raises(TextFormatError):
        assembler.add(b"x" * 60, cont=True)
