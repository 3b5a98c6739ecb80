"""StorageClass parameters through the master, the master:// --backend, and the publish
context built from the master's view of a volume (every copy's portals, the primary's first)."""

from __future__ import annotations

import re
import uuid

import pytest

from blockyard import tls
from blockyard.csi.errors import InvalidParameterError
from blockyard.csi.master_backend import describe, export_of, parse_master_backend
from blockyard.csi.params import VolumeParameters, parse_parameters
from blockyard.csi.publish_rules import publish_context
from blockyard.csi.server import ConfigError, build_config
from blockyard.engine.epoch import Role
from blockyard.errors import InvalidArgumentError
from blockyard.master.proto import master_pb2 as mpb
from blockyard.scsi.alua import AccessState
from blockyard.scsi.identity import LuIdentity
from blockyard.server.proto import volume_server_pb2 as vpb

# ---- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, VolumeParameters(replicas=0, durability="")),
        ({"replicas": "1"}, VolumeParameters(replicas=1, durability="")),
        ({"replicas": "3", "durability": "sync_quorum"}, VolumeParameters("", 3, "sync_quorum")),
        ({"durability": "best_effort", "fsType": "xfs"}, VolumeParameters("xfs", 0, "best_effort")),
        ({"durability": "sync_all"}, VolumeParameters(replicas=0, durability="sync_all")),
    ],
)
def test_replicated_parameters(params: dict[str, str], expected: VolumeParameters) -> None:
    assert parse_parameters("parameters", params, replicated=True) == expected


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"replicas": "0"}, ("replicas", "1 to 3")),
        ({"replicas": "4"}, ("replicas", "1 to 3")),
        ({"replicas": "two"}, ("replicas", "1 to 3")),
        ({"replicas": "-1"}, ("replicas", "1 to 3")),
        ({"durability": "local"}, ("durability", "sync_all", "one volume server")),
        ({"durability": "SYNC_ALL"}, ("durability", "best_effort, sync_all, sync_quorum")),
        ({"replica": "2"}, ("unknown parameter", "'replica'")),
    ],
)
def test_replicated_parameters_refused_with_a_clear_message(
    params: dict[str, str], words: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_parameters("parameters", params, replicated=True)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("params", [{"replicas": "2"}, {"durability": "sync_all"}])
def test_one_server_still_refuses_replication_and_names_the_master(
    params: dict[str, str],
) -> None:
    with pytest.raises(InvalidParameterError, match="master://"):
        parse_parameters("parameters", params)


def test_one_server_defaults_unchanged() -> None:
    assert parse_parameters("parameters", {"replicas": "1", "durability": "local"}) == (
        VolumeParameters(replicas=1, durability="local")
    )


# ---- --backend master://... ------------------------------------------------------------------


def test_master_backend_addresses() -> None:
    assert parse_master_backend("master://127.0.0.1:9333") == ["127.0.0.1:9333"]
    assert parse_master_backend("master://127.0.0.1:1,127.0.0.1:2/") == [
        "127.0.0.1:1",
        "127.0.0.1:2",
    ]
    for bad in ("master://", "master://host", "master://h:0", "127.0.0.1:1"):
        with pytest.raises(InvalidArgumentError):
            parse_master_backend(bad)


def _config(backend: str) -> object:
    return build_config(
        endpoint="unix:///tmp/x.sock",
        mode="controller",
        node_id="n",
        backend=backend,
        state_dir=None,
        kubelet_dir=None,
        managed_prefix=None,
        metrics_listen=None,
        topology=None,
    )


def test_build_config_takes_a_master_backend_and_checks_every_address() -> None:
    _config("master://127.0.0.1:1,[::1]:2")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        _config("master://127.0.0.1")
    # Plaintext off loopback without --insecure is refused for every master address.
    with pytest.raises(ConfigError, match=re.escape("10.0.0.9")):
        _config("master://127.0.0.1:1,10.0.0.9:2")


# ---- publish context from the master's view --------------------------------------------------

VOLUME_UUID = uuid.UUID("28bb0dce-df37-4c8f-b453-24166558ccda")


def _copy(sid: str, role: int, state: str, *portals: str, zone: str = "") -> mpb.CopyInfo:
    return mpb.CopyInfo(
        server_id=sid,
        role=role,  # type: ignore[arg-type]
        state=state,
        zone=zone,
        addresses=mpb.ServerAddresses(iscsi_portals=list(portals), api=f"{sid}:1"),
    )


def _info(primary: str, *copies: mpb.CopyInfo) -> mpb.VolumeInfo:
    return mpb.VolumeInfo(
        name="v",
        uuid=str(VOLUME_UUID),
        size_bytes=1 << 20,
        replica_count=len(copies),
        epoch=3,
        primary_server_id=primary,
        copies=list(copies),
        iqn="iqn.2026-11.io.blockyard:v.28bb0dcedf37",
        mode=vpb.DURABILITY_MODE_SYNC_ALL,
    )


def test_publish_context_lists_the_primary_first_wherever_the_master_lists_it() -> None:
    info = _info(
        "b",
        _copy("a", vpb.ROLE_REPLICA, "out_of_sync", "10.0.0.1:3260"),
        _copy("c", vpb.ROLE_REPLICA, "in_sync", "10.0.0.3:3260", "[fd00::3]:3260"),
        _copy("b", vpb.ROLE_PRIMARY, "in_sync", "10.0.0.2:3260", "10.0.1.2:3260"),
    )
    ctx = publish_context(describe(info))
    assert ctx["portals"].split(",") == [
        "10.0.0.2:3260",
        "10.0.1.2:3260",
        "10.0.0.3:3260",
        "[fd00::3]:3260",
        "10.0.0.1:3260",
    ]
    assert ctx["portal"] == "10.0.0.2:3260"
    assert ctx["iqn"] == info.iqn
    assert ctx["lun"] == "0"
    # The same NAA id every server reports for the volume (derived from its UUID).
    assert ctx["naaId"] == LuIdentity(VOLUME_UUID).naa_id().hex()


def test_portal_states_follow_the_copies() -> None:
    info = _info(
        "b",
        _copy("b", vpb.ROLE_PRIMARY, "in_sync", "10.0.0.2:3260"),
        _copy("a", vpb.ROLE_REPLICA, "dead", "10.0.0.1:3260"),
        _copy("c", vpb.ROLE_REBUILDING, "rebuilding", "10.0.0.3:3260"),
        _copy("d", vpb.ROLE_REPLICA, "in_sync", "10.0.0.4:3260"),
    )
    export = export_of(info)
    assert [(p.address, p.state) for p in export.portals] == [
        ("10.0.0.2:3260", AccessState.ACTIVE_OPTIMIZED),
        ("10.0.0.4:3260", AccessState.STANDBY),
        ("10.0.0.1:3260", AccessState.UNAVAILABLE),
        ("10.0.0.3:3260", AccessState.UNAVAILABLE),
    ]
    assert [p.portal_group_tag for p in export.portals] == [1, 2, 3, 4]


def test_a_dead_primary_is_not_offered_first() -> None:
    """Between the primary's death and the promotion, the in-sync replica leads."""
    info = _info(
        "a",
        _copy("a", vpb.ROLE_PRIMARY, "dead", "10.0.0.1:3260"),
        _copy("b", vpb.ROLE_REPLICA, "in_sync", "10.0.0.2:3260"),
    )
    assert publish_context(describe(info))["portals"] == "10.0.0.2:3260,10.0.0.1:3260"


def test_describe_carries_role_epoch_zones_and_durability() -> None:
    info = _info(
        "b",
        _copy("b", vpb.ROLE_PRIMARY, "in_sync", "10.0.0.2:3260", zone="z2"),
        _copy("a", vpb.ROLE_REPLICA, "in_sync", "10.0.0.1:3260", zone="z1"),
        _copy("c", vpb.ROLE_REPLICA, "in_sync", "10.0.0.3:3260", zone="z2"),
    )
    desc = describe(info)
    assert (desc.role, desc.epoch, desc.uuid, desc.size_bytes) == (
        Role.PRIMARY,
        3,
        VOLUME_UUID,
        1 << 20,
    )
    assert desc.zones == ("z2", "z1")
    assert (desc.replica_count, desc.durability) == (3, "sync_all")
    assert describe(_info("a", _copy("a", vpb.ROLE_PRIMARY, "in_sync", "h:1"))).zones == ()


def test_master_insecure_covers_only_the_master() -> None:
    """--master-insecure lets the controller dial a plaintext master off loopback while the
    copies' volume servers keep the --tls-* settings."""
    files = tls.TlsFiles("c.pem", "k.pem", "ca.pem")
    config = build_config(
        endpoint="unix:///tmp/x.sock",
        mode="controller",
        node_id="n",
        backend="master://10.0.0.9:9333",
        state_dir=None,
        kubelet_dir=None,
        managed_prefix=None,
        metrics_listen=None,
        topology=None,
        backend_security=tls.TransportSecurity(tls=files),
        master_insecure=True,
    )
    assert config.master_security == tls.TransportSecurity(insecure=True)
    assert config.backend_security.tls == files
    with pytest.raises(ConfigError, match="master-insecure"):
        build_config(
            endpoint="unix:///tmp/x.sock",
            mode="controller",
            node_id="n",
            backend="127.0.0.1:7400",
            state_dir=None,
            kubelet_dir=None,
            managed_prefix=None,
            metrics_listen=None,
            topology=None,
            master_insecure=True,
        )


def test_master_is_dialed_with_tls_and_checked_against_its_own_name() -> None:
    """Without --master-insecure the master is dialed with the same certificate, but its
    certificate must name the host in master://, not --tls-server-name (the name the volume
    servers' shared certificate carries)."""
    files = tls.TlsFiles("c.pem", "k.pem", "ca.pem")
    config = build_config(
        endpoint="unix:///tmp/x.sock",
        mode="controller",
        node_id="n",
        backend="master://master.example:9333",
        state_dir=None,
        kubelet_dir=None,
        managed_prefix=None,
        metrics_listen=None,
        topology=None,
        backend_security=tls.TransportSecurity(tls=files, server_name="api.example"),
    )
    assert config.master_security == tls.TransportSecurity(tls=files)
    assert config.backend_security.server_name == "api.example"
