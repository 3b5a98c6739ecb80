"""Per-volume access rules: the VolumeAuth value, its file (0600, atomic, fail-closed), the
manager exporting them to every portal group, and ending exactly the sessions a change no
longer admits (including a login that completed with the old rules)."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from blockyard.errors import CorruptionError, InvalidArgumentError, NoSpaceError
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.discovery import MAX_NAME_LENGTH, is_valid_iscsi_name
from blockyard.server import auth as auth_mod
from blockyard.server import manager_access
from blockyard.server.auth import (
    AUTH_FILE,
    MAX_ALLOWED_INITIATORS,
    OPEN,
    VolumeAuth,
    load_auth,
    save_auth,
)
from blockyard.server.iscsi_server import DictTargetRegistry, IscsiServer, ServerSettings
from blockyard.server.manager import PortalGroup, VolumeManager, volume_iqn

T = TypeVar("T")
MIB = 1 << 20
CHAP = ChapCredentials("user-1", b"secret-one-0123")
TARGET = ChapCredentials("target-1", b"secret-two-4567")
A = "iqn.2024-01.io.example:a"
B = "iqn.2024-01.io.example:b"
PREFIX = "iqn.2026-11.io.blockyard"


# ---- the value -------------------------------------------------------------------------------


def test_rules_are_validated() -> None:
    with pytest.raises(InvalidArgumentError, match="mutual CHAP needs initiator CHAP"):
        VolumeAuth(mutual_chap=TARGET)
    with pytest.raises(InvalidArgumentError, match="identical"):
        VolumeAuth(chap=CHAP, mutual_chap=ChapCredentials("t", CHAP.secret))
    with pytest.raises(InvalidArgumentError, match="not a valid iSCSI name"):
        VolumeAuth(allowed_initiators=frozenset({"Not-An-IQN"}))
    many = frozenset(f"iqn.2024-01.io.example:n{i}" for i in range(MAX_ALLOWED_INITIATORS + 1))
    with pytest.raises(InvalidArgumentError, match=f"at most {MAX_ALLOWED_INITIATORS}"):
        VolumeAuth(allowed_initiators=many)


def test_allow_and_revoke_are_idempotent_and_fence_open_volumes() -> None:
    assert OPEN.admits(A) and not OPEN.restricted
    only_a = OPEN.allowing(A)
    assert only_a.allowed_initiators == {A} and only_a.allowing(A) == only_a
    assert not only_a.admits(B)
    # Revoking from an open volume cannot mean "everyone but B": it fences everyone.
    assert OPEN.revoking(B).allowed_initiators == frozenset()
    assert only_a.revoking(A).revoking(A) == VolumeAuth(allowed_initiators=frozenset())


def test_no_secret_in_repr_or_summary() -> None:
    rules = VolumeAuth(chap=CHAP, mutual_chap=TARGET, allowed_initiators=frozenset({A}))
    for text in (repr(rules), str(rules), repr(rules.info())):
        assert CHAP.secret.decode() not in text and TARGET.secret.decode() not in text
    assert rules.info().chap_user == "user-1" and rules.info().allowed_initiators == (A,)


# ---- the file --------------------------------------------------------------------------------


def test_file_round_trip_mode_and_removal(tmp_path: Path) -> None:
    rules = VolumeAuth(chap=CHAP, mutual_chap=TARGET, allowed_initiators=frozenset({A, B}))
    (tmp_path / f".{AUTH_FILE}.leftover").write_bytes(b"half")  # an interrupted save
    save_auth(str(tmp_path), rules)
    path = tmp_path / AUTH_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_auth(str(tmp_path), "v") == rules
    assert not (tmp_path / f".{AUTH_FILE}.leftover").exists()
    assert load_auth(str(tmp_path), "v").allowed_initiators == {A, B}
    save_auth(str(tmp_path), VolumeAuth(allowed_initiators=frozenset()))
    assert load_auth(str(tmp_path), "v") == VolumeAuth(allowed_initiators=frozenset())
    save_auth(str(tmp_path), OPEN)
    assert not path.exists() and load_auth(str(tmp_path), "v") == OPEN


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"version": 9}',
        b'{"version": 1, "chap": {"user": "u", "secret": "!!"}}',
        b'{"version": 1, "chap": {"user": "u", "secret": "c2hvcnQ="}}',  # 5-byte secret
        b'{"version": 1, "allowed_initiators": "iqn.2024-01.io.example:a"}',
        b'{"version": 1, "allowed_initiators": ["NOT AN IQN"]}',
        b" " * (auth_mod.AUTH_FILE_BYTES_MAX + 1),
    ],
)
def test_a_damaged_file_fails_closed(tmp_path: Path, content: bytes) -> None:
    (tmp_path / AUTH_FILE).write_bytes(content)
    with pytest.raises(CorruptionError, match="not served"):
        load_auth(str(tmp_path), "v")


# ---- IQNs ------------------------------------------------------------------------------------


def test_iqn_names_the_volume_instance() -> None:
    one, two = uuid.uuid4(), uuid.uuid4()
    assert volume_iqn(PREFIX, "live", one) == f"{PREFIX}:live.{one.hex[:12]}"
    assert volume_iqn(PREFIX, "live", one) != volume_iqn(PREFIX, "live", two)
    # A replica elsewhere has the same UUID, hence the same IQN (multipath needs that).
    assert volume_iqn(PREFIX, "live", one) == volume_iqn(PREFIX, "live", uuid.UUID(str(one)))
    longest = volume_iqn(PREFIX, "v" * 128, one)
    assert len(longest) <= MAX_NAME_LENGTH and is_valid_iscsi_name(longest)
    odd = volume_iqn(PREFIX, "Vol_1", one)
    assert is_valid_iscsi_name(odd) and odd != volume_iqn(PREFIX, "vol-1", one)


# ---- the manager -----------------------------------------------------------------------------


def make_manager(data_dir: Path) -> VolumeManager:
    groups = []
    for tag in (1, 2):
        settings = ServerSettings(relative_target_port_id=tag, target_port_group_id=tag)
        registry = DictTargetRegistry()
        server = IscsiServer(registry, "127.0.0.1", 0, settings=settings)
        groups.append(PortalGroup(tag, server, registry, "127.0.0.1"))
    return VolumeManager(str(data_dir), groups)


def run_with(data_dir: Path, body: Callable[[VolumeManager], Awaitable[T]]) -> T:
    async def main() -> T:
        m = make_manager(data_dir)
        await m.start()
        for g in m._groups:
            await g.server.start()
        try:
            return await body(m)
        finally:
            for g in m._groups:
                await g.server.close(5)
            await m.close(10)

    return asyncio.run(main())


def test_rules_reach_every_portal_group_and_survive_a_restart(tmp_path: Path) -> None:
    async def first(m: VolumeManager) -> str:
        await m.create_volume("v", 4 * MIB)
        await m.set_volume_auth("v", CHAP, TARGET)
        desc = await m.allow_initiator("v", A)
        assert desc.access.restricted and desc.access.allowed_initiators == (A,)
        assert desc.access.chap_user == "user-1" and desc.access.mutual_chap_user == "target-1"
        for g in m._groups:
            served = g.registry.lookup(desc.export.iqn)
            assert served is not None
            assert served.config.chap == CHAP and served.config.mutual_chap == TARGET
            assert served.config.allowed_initiators == {A}
        return desc.export.iqn

    iqn = run_with(tmp_path, first)

    async def second(m: VolumeManager) -> None:
        desc = await m.get_volume("v")
        assert desc.export.iqn == iqn
        assert desc.access.allowed_initiators == (A,) and desc.access.chap_user == "user-1"
        served = m._groups[0].registry.lookup(iqn)
        assert served is not None and served.config.chap == CHAP

    run_with(tmp_path, second)


def test_a_damaged_rules_file_keeps_only_that_volume_unserved(tmp_path: Path) -> None:
    async def make(m: VolumeManager) -> None:
        await m.create_volume("good", 4 * MIB)
        await m.create_volume("bad", 4 * MIB)
        await m.allow_initiator("bad", A)

    run_with(tmp_path, make)
    (tmp_path / "bad" / AUTH_FILE).write_bytes(b"{garbage")

    async def check(m: VolumeManager) -> None:
        assert [d.name for d in (await m.list_volumes()).volumes] == ["good"]

    run_with(tmp_path, check)


def test_delete_and_recreate_gets_a_new_target_without_the_old_rules(tmp_path: Path) -> None:
    async def body(m: VolumeManager) -> None:
        old = await m.allow_initiator((await m.create_volume("v", 4 * MIB)).name, A)
        await m.delete_volume("v")
        new = await m.create_volume("v", 4 * MIB)
        assert new.export.iqn != old.export.iqn
        assert not new.access.restricted, "rules of a deleted volume carried over"
        assert all(g.registry.lookup(old.export.iqn) is None for g in m._groups)

    run_with(tmp_path, body)


@dataclass
class FakeParams:
    initiator_name: str


@dataclass
class FakeConn:
    target_name: str
    params: FakeParams
    closed: bool = False


@dataclass
class FakeProto:
    """Stands for one connection of an IscsiServer: what the manager looks at and calls."""

    conn: FakeConn
    closed: list[str] = field(default_factory=list)

    def close(self, reason: str) -> None:
        self.closed.append(reason)
        self.conn.closed = True

    def __hash__(self) -> int:
        return id(self)


def test_a_change_ends_exactly_the_sessions_it_no_longer_admits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_access, "ACL_RECHECK_DELAY_S", 0.05)

    async def body(m: VolumeManager) -> None:
        v = await m.create_volume("v", 4 * MIB)
        w = await m.create_volume("w", 4 * MIB)
        await m.set_volume_access("v", [A, B])
        server = m._groups[0].server
        a_v = FakeProto(FakeConn(v.export.iqn, FakeParams(A)))
        b_v = FakeProto(FakeConn(v.export.iqn, FakeParams(B)))
        a_w = FakeProto(FakeConn(w.export.iqn, FakeParams(A)))
        late = FakeProto(FakeConn(v.export.iqn, FakeParams(A)))
        fakes = (a_v, b_v, a_w, late)
        for proto in (a_v, b_v, a_w):
            server.connections.add(proto)  # type: ignore[arg-type]
        try:
            await m.revoke_initiator("v", A)
            assert len(a_v.closed) == 1 and "no longer allowed" in a_v.closed[0]
            assert b_v.closed == [] and a_w.closed == []
            # A login that began under the old rules completes now: the recheck ends it.
            server.connections.add(late)  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            assert len(late.closed) == 1 and len(a_v.closed) == 1 and b_v.closed == []
            # An unchanged ACL (a retried revoke) ends nothing.
            await m.revoke_initiator("v", A)
            assert [len(p.closed) for p in fakes] == [1, 0, 0, 1]
        finally:
            for proto in fakes:
                server.connections.discard(proto)  # type: ignore[arg-type]

    run_with(tmp_path, body)


def test_turning_chap_on_ends_unauthenticated_sessions_but_rotation_does_not(
    tmp_path: Path,
) -> None:
    async def body(m: VolumeManager) -> None:
        v = await m.create_volume("v", 4 * MIB)
        server = m._groups[0].server
        ended: list[str] = []
        monkey = server.drop_sessions
        server.drop_sessions = lambda iqn: ended.append(iqn) or 0  # type: ignore[method-assign]
        try:
            await m.set_volume_auth("v", CHAP)
            assert ended == [v.export.iqn]
            await m.set_volume_auth("v", ChapCredentials("user-1", b"rotated-secret-99"))
            assert ended == [v.export.iqn], "a secret rotation ended sessions"
        finally:
            server.drop_sessions = monkey  # type: ignore[method-assign]

    run_with(tmp_path, body)


def test_rules_file_is_written_before_new_logins_see_it(tmp_path: Path) -> None:
    """A caller told "done" must find the rules after a crash: the file is saved first."""

    async def body(m: VolumeManager) -> None:
        await m.create_volume("v", 4 * MIB)
        real = auth_mod.save_auth

        def failing(directory: str, rules: VolumeAuth) -> None:
            raise NoSpaceError("no space left to save the access settings")

        manager_access.save_auth = failing  # type: ignore[assignment]
        try:
            with pytest.raises(NoSpaceError):
                await m.allow_initiator("v", A)
        finally:
            manager_access.save_auth = real
        desc = await m.get_volume("v")
        assert not desc.access.restricted, "rules applied although they were not saved"
        assert not os.path.exists(tmp_path / "v" / AUTH_FILE)

    run_with(tmp_path, body)
