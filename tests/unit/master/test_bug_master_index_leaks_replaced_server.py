"""sw-block's registry kept a replaced server in its indexes: a new server on the same address
(a new id) still resolved to the old one, and a forgotten server stayed in the zone index."""

from __future__ import annotations

from dataclasses import replace

from master_harness import server_record, volume_record

from blockyard.master.model import ServerAddresses
from blockyard.master.registry import Registry


def test_replaced_server_on_the_same_address() -> None:
    r = Registry()
    old = replace(server_record("s1", zone="a"))
    r.put_server(old, 1)
    new = replace(old, server_id="s9")  # same addresses, new id: the disk was replaced
    r.put_server(new, 1)
    assert r.server_for_replication(old.addresses.replication) == "s9"
    r.remove_server("s1")  # forgetting the old one must not drop the new one's entry
    assert r.server_for_replication(old.addresses.replication) == "s9"
    assert r.servers_in_zone("a") == {"s9"}
    r.remove_server("s9")
    assert r.index_sizes() == (0, 0, 0)


def test_changed_address_and_zone_drop_the_old_entries() -> None:
    r = Registry()
    rec = server_record("s1", zone="a")
    r.put_server(rec, 1)
    moved = replace(rec, zone="b", addresses=ServerAddresses((), "x:1", "10.9.9.9:9600"))
    r.put_server(moved, 2)
    assert r.server_for_replication(rec.addresses.replication) is None
    assert r.server_for_replication("10.9.9.9:9600") == "s1"
    assert r.servers_in_zone("a") == frozenset() and "a" not in r.zones
    assert r.index_sizes()[:2] == (1, 1)


def test_volume_copies_index_follows_the_record() -> None:
    r = Registry()
    v = volume_record(primary="s1", replicas=("s2",))
    r.put_volume(v, 1)
    assert r.volumes_on("s2") == {"vol"}
    r.put_volume(v.without_copy("s2"), 2)
    assert r.volumes_on("s2") == frozenset()
    r.remove_volume("vol")
    assert r.index_sizes() == (0, 0, 0)
