"""The volume manager's access control (a mixin of :class:`~blockyard.server.manager.
VolumeManager`): per-volume CHAP and initiator ACLs, and ending the sessions a change no
longer admits.

Changes are durable before they take effect (the rules file is replaced atomically); sessions
of initiators no longer admitted are ended at once and checked again shortly after, to catch a
login that raced with the change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Final, TypeVar

from blockyard.iscsi.chap import ChapCredentials
from blockyard.server.auth import VolumeAuth, check_initiator_name, save_auth
from blockyard.server.backend import VolumeDescription
from blockyard.server.validation import check_volume_name

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from blockyard.server.manager import PortalGroup, _Exported, _Op

log = logging.getLogger("blockyard.server.manager")

T = TypeVar("T")

#: A login that began before an ACL change may complete after it with the old rules; the
#: sessions of initiators no longer admitted are looked for again this much later.
ACL_RECHECK_DELAY_S: Final = 2.0


class AccessOps:
    """CHAP and ACLs in the volume manager; uses the manager's state (declared below)."""

    if TYPE_CHECKING:
        _exported: dict[str, _Exported]
        _groups: tuple[PortalGroup, ...]
        _rechecks: set[asyncio.TimerHandle]
        _stopping: bool

        def _exclusive(self, *names: str) -> AbstractContextManager[_Op]: ...
        def _require(self, name: str) -> _Exported: ...
        def _export(self, exp: _Exported) -> None: ...
        async def _describe(self, op: _Op | None, exp: _Exported) -> VolumeDescription: ...
        async def _offload(
            self, op: _Op | None, what: str, fn: Callable[..., T], *args: object
        ) -> T: ...

    async def set_volume_auth(
        self,
        name: str,
        chap: ChapCredentials | None,
        mutual_chap: ChapCredentials | None = None,
    ) -> VolumeDescription:
        check_volume_name("name", name)
        with self._exclusive(name) as op:
            exp = self._require(name)
            before = exp.auth
            await self._apply_auth(op, exp, before.with_chap(chap, mutual_chap))
            dropped = 0
            if before.chap is None and chap is not None:
                # Sessions that logged in without CHAP did not authenticate: end them.
                dropped = sum(g.server.drop_sessions(exp.iqn) for g in self._serving_groups())
            log.info(
                "volume %s: CHAP %s, mutual CHAP %s (%d sessions ended)",
                name,
                f"required for user {chap.name!r}" if chap is not None else "off",
                "on" if mutual_chap is not None else "off",
                dropped,
            )
            return await self._describe(op, exp)

    async def set_volume_access(
        self, name: str, allowed_initiators: Collection[str] | None
    ) -> VolumeDescription:
        check_volume_name("name", name)
        if allowed_initiators is not None:
            allowed_initiators = [
                check_initiator_name("allowed_initiators", n) for n in allowed_initiators
            ]
        with self._exclusive(name) as op:
            exp = self._require(name)
            return await self._change_access(op, exp, exp.auth.with_access(allowed_initiators))

    async def allow_initiator(self, name: str, initiator_name: str) -> VolumeDescription:
        check_volume_name("name", name)
        check_initiator_name("initiator_name", initiator_name)
        with self._exclusive(name) as op:
            exp = self._require(name)
            return await self._change_access(op, exp, exp.auth.allowing(initiator_name))

    async def revoke_initiator(self, name: str, initiator_name: str) -> VolumeDescription:
        check_volume_name("name", name)
        check_initiator_name("initiator_name", initiator_name)
        with self._exclusive(name) as op:
            exp = self._require(name)
            return await self._change_access(op, exp, exp.auth.revoking(initiator_name))

    async def _apply_auth(self, op: _Op, exp: _Exported, auth: VolumeAuth) -> bool:
        """Persist ``auth`` and export it; returns whether anything changed. The file is
        written first, so rules a caller was told about survive a restart."""
        if auth == exp.auth:
            return False
        directory = exp.volume.directory
        await self._offload(op, "save the access settings", save_auth, directory, auth)
        exp.auth = auth
        self._export(exp)
        return True

    async def _change_access(self, op: _Op, exp: _Exported, auth: VolumeAuth) -> VolumeDescription:
        if await self._apply_auth(op, exp, auth):
            dropped = self._drop_unadmitted(exp)
            self._schedule_recheck(exp)
            info = auth.info()
            log.info(
                "volume %s admits %s (%d sessions ended)",
                exp.volume.name,
                ", ".join(info.allowed_initiators) or "no initiator"
                if info.restricted
                else "every initiator",
                dropped,
            )
        return await self._describe(op, exp)

    def _serving_groups(self) -> list[PortalGroup]:
        return [g for g in self._groups if g.server.serving]

    def _drop_unadmitted(self, exp: _Exported) -> int:
        """End the sessions of ``exp``'s target whose initiator its rules no longer admit;
        every other session, of this target or another, is left alone. Returns how many."""
        dropped = 0
        for group in self._serving_groups():
            for proto in list(group.server.connections):
                conn = proto.conn
                if conn is None or conn.closed or conn.target_name != exp.iqn:
                    continue
                initiator = conn.params.initiator_name
                if exp.auth.admits(initiator):
                    continue
                proto.close(f"initiator {initiator} is no longer allowed to use {exp.iqn}")
                dropped += 1
        return dropped

    def _schedule_recheck(self, exp: _Exported) -> None:
        """Look again a little later: a login that read the old rules just before the change
        may only now have completed (the target login checks the ACL when it starts)."""
        loop = asyncio.get_running_loop()

        def recheck() -> None:
            self._rechecks.discard(handle)
            if self._exported.get(exp.volume.name) is exp and not self._stopping:
                late = self._drop_unadmitted(exp)
                if late:
                    log.warning(
                        "ended %d sessions of %s that logged in with the old access rules",
                        late,
                        exp.iqn,
                    )

        handle = loop.call_later(ACL_RECHECK_DELAY_S, recheck)
        self._rechecks.add(handle)
