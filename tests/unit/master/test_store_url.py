"""``--store`` URL parsing: what each accepted form means, and that every bad one is refused
with a StoreUrlError (a usage error) saying what to write."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockyard.errors import InvalidArgumentError, StoreUrlError
from blockyard.master.store_etcd import EtcdStore
from blockyard.master.store_sqlite import SqliteStore
from blockyard.master.store_url import (
    DEFAULT_ETCD_PREFIX,
    EtcdUrl,
    SqliteUrl,
    make_store,
    parse_store_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///var/lib/blockyard/master.db", SqliteUrl("/var/lib/blockyard/master.db")),
        ("SQLITE:///m.db", SqliteUrl("/m.db")),
        ("sqlite:////var/m.db", SqliteUrl("/var/m.db")),
        ("etcd://127.0.0.1:2379", EtcdUrl(("127.0.0.1:2379",), DEFAULT_ETCD_PREFIX)),
        (
            "etcd://a:2379,b.example:2380,[::1]:2381",
            EtcdUrl(("a:2379", "b.example:2380", "[::1]:2381"), DEFAULT_ETCD_PREFIX),
        ),
        ("etcd://a:1/", EtcdUrl(("a:1",), DEFAULT_ETCD_PREFIX)),
        ("etcd://a:1/team/blockyard", EtcdUrl(("a:1",), "/team/blockyard/")),
        ("etcd://a:01", EtcdUrl(("a:1",), DEFAULT_ETCD_PREFIX)),
    ],
)
def test_accepted(url: str, expected: object) -> None:
    assert parse_store_url(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "no scheme"),
        ("/var/lib/m.db", "no scheme"),
        ("postgres://h/db", "unknown scheme"),
        ("sqlite://m.db", "absolute"),
        ("sqlite://relative/m.db", "absolute"),
        ("sqlite:///var/lib/", "directory"),
        ("sqlite:///var/..", "directory"),
        ("sqlite:///m.db?mode=ro", "query"),
        ("etcd://", "no etcd endpoint"),
        ("etcd://h", "no port"),
        ("etcd://h:0", "1-65535"),
        ("etcd://h:65536", "1-65535"),
        ("etcd://h:x", "1-65535"),
        ("etcd://:2379", "no port"),
        ("etcd://h_h:2379", "not a host"),
        ("etcd://a:1,a:1", "twice"),
        ("etcd://a:1,", "no port"),
        ("etcd://[::1]", "[IPV6]:PORT"),
        ("etcd://a:1/bad prefix", "prefix"),
        ("etcd://" + ",".join(f"h{i}:1" for i in range(17)), "at most"),
        ("etcd://h:1/" + "x" * 5000, "characters long"),
    ],
)
def test_refused_with_what_to_write(url: str, says: str) -> None:
    with pytest.raises(StoreUrlError) as info:
        parse_store_url(url)
    assert says in str(info.value)
    assert isinstance(info.value, InvalidArgumentError)  # a usage error


def test_make_store_builds_the_named_store_unopened(tmp_path: Path) -> None:
    sqlite = make_store(f"sqlite:///{tmp_path}/m.db")
    assert isinstance(sqlite, SqliteStore)
    assert sqlite.path == tmp_path / "m.db"
    assert not (tmp_path / "m.db").exists()  # not opened yet
    etcd = make_store("etcd://a:1,b:2/x", election_ttl_s=7)
    assert isinstance(etcd, EtcdStore)
    assert (etcd.endpoints, etcd.prefix) == (("a:1", "b:2"), "/x/")
