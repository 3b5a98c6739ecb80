"""The session's requests other than SCSI commands (a mixin of
:class:`~blockyard.attach.initiator.connection.IscsiConnection`): ABORT TASK for a command that
timed out (RFC 7143 §11.5.1), SendTargets over Text requests (Appendix C, §11.10), NOP-Out
pings and the keepalive that fails a silent connection, answers to the target's pings
(§11.18, §11.19), Logout (§11.14) and the Asynchronous Messages that ask us to leave (§11.9.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from blockyard.attach.initiator.addressing import parse_target_address
from blockyard.attach.initiator.connection_types import (
    _SN_MASK,
    CommandOutcome,
    _Task,
)
from blockyard.attach.initiator.errors import CommandTimeoutError, PathFailedError
from blockyard.errors import BlockyardError
from blockyard.iscsi.discovery import DiscoveryTarget, Portal
from blockyard.iscsi.pdu import (
    RESERVED_TAG,
    AsyncEvent,
    AsyncMessage,
    LogoutReason,
    LogoutRequest,
    NopIn,
    NopOut,
    Pdu,
    TaskManagementFunction,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
)
from blockyard.iscsi.target_session import serial_le
from blockyard.iscsi.text import TextAssembler, encode_text, parse_text

if TYPE_CHECKING:
    from blockyard.attach.initiator.connection_types import _ConnectionParts
else:
    _ConnectionParts = object

log = logging.getLogger("blockyard.attach.initiator")

#: Bound on SendTargets text gathered over continued Text Responses (RFC 7143 §6.1 asks for
#: at least 8192; a large cluster's answer stays far below this).
MAX_SEND_TARGETS_TEXT_BYTES = 1 << 20
#: Bound on Text Request/Response rounds of one SendTargets exchange.
MAX_TEXT_ROUNDS = 256


class SessionControl(_ConnectionParts):
    """Task management, Text, NOP and Logout of the connection; uses the connection's state
    (declared in ``_ConnectionParts`` and below)."""

    if TYPE_CHECKING:
        draining: bool
        _failed: PathFailedError | None
        _waiters: dict[int, asyncio.Future[Pdu]]
        _text: TextAssembler
        _last_rx: float
        _ping_itt: int | None
        _ping_sent: float

        @property
        def alive(self) -> bool: ...
        def abort(self, reason: str) -> None: ...
        def _resolve_waiter(self, itt: int, pdu: Pdu) -> None: ...
        def _fail(self, reason: str, cause: BaseException | None = None) -> None: ...
        def _close_quietly(self) -> None: ...

    # ---- task management ----------------------------------------------------------------

    async def _abort_quietly(self, task: _Task) -> None:
        with contextlib.suppress(BlockyardError):
            await self._abort_task(task, 0.0)

    async def _abort_task(self, task: _Task, timeout: float) -> CommandOutcome:
        """ABORT TASK (RFC 7143 §11.5.1) for a timed-out command. The ITT stays reserved until
        the target answers, so a late Data-In can never land in a reused task's buffer."""
        task.aborting = True
        try:
            if not self.alive:
                raise self._failed or PathFailedError(f"{self._where()} is closed")
            itt = self._next_itt()
            waiter: asyncio.Future[Pdu] = self._new_future()
            self._waiters[itt] = waiter
            self._send(
                TaskManagementRequest(
                    itt=itt,
                    function=TaskManagementFunction.ABORT_TASK,
                    lun=task.lun,
                    referenced_task_tag=task.itt,
                    cmd_sn=self._cmd_sn,
                    exp_stat_sn=self._exp_stat_sn,
                    ref_cmd_sn=task.cmd_sn,
                    immediate=True,
                )
            )
            try:
                async with asyncio.timeout(self.settings.tmf_timeout_s):
                    response = await waiter
            except TimeoutError:
                self._fail(
                    f"ABORT TASK for ITT {task.itt:#x} got no answer within "
                    f"{self.settings.tmf_timeout_s} s"
                )
                raise self._failed or PathFailedError("connection failed") from None
            finally:
                self._waiters.pop(itt, None)
            code = response.response if isinstance(response, TaskManagementResponse) else -1
            log.warning(
                "command ITT %#x on %s timed out after %.1f s; ABORT TASK answered %s",
                task.itt,
                self._where(),
                timeout,
                code,
            )
            raise CommandTimeoutError(
                f"command timed out after {timeout} s on {self._where()} and was aborted"
            )
        finally:
            self._tasks.pop(task.itt, None)
            if not task.future.done():
                task.future.cancel()

    # ---- text, NOP, logout --------------------------------------------------------------

    async def send_targets(self, value: str = "All") -> list[DiscoveryTarget]:
        """SendTargets (RFC 7143 Appendix C) over this session; continued responses are
        gathered up to MAX_SEND_TARGETS_TEXT_BYTES."""
        itt = self._next_itt()
        ttt = RESERVED_TAG
        data = encode_text([("SendTargets", value)])
        text: bytes | None = None
        for _ in range(MAX_TEXT_ROUNDS):
            request = TextRequest(itt=itt, ttt=ttt, data=data)
            response = await self._numbered_request(request, itt)
            if not isinstance(response, TextResponse):
                raise PathFailedError(f"expected a Text Response, got {type(response).__name__}")
            text = self._text.add(response.data, cont=response.cont)
            if text is not None and response.final:
                break
            # RFC 7143 §11.10.4: ask for the rest with an empty request carrying the TTT.
            ttt = response.ttt
            data = b""
        if text is None:
            raise PathFailedError("SendTargets answer did not end within the round bound")
        targets: list[DiscoveryTarget] = []
        name: str | None = None
        portals: list[Portal] = []
        for key, val in parse_text(text):
            if key == "TargetName":
                if name is not None:
                    targets.append(DiscoveryTarget(name, tuple(portals)))
                name, portals = val, []
            elif key == "TargetAddress" and name is not None:
                portals.append(parse_target_address(val))
        if name is not None:
            targets.append(DiscoveryTarget(name, tuple(portals)))
        return targets

    async def _numbered_request(self, request: TextRequest, itt: int) -> Pdu:
        """Send a non-immediate request that takes a CmdSN and wait for its answer."""
        timeout = self.settings.command_timeout_s
        waiter: asyncio.Future[Pdu] = self._new_future()
        self._waiters[itt] = waiter
        try:
            async with asyncio.timeout(timeout):
                while not serial_le(self._cmd_sn, self._max_cmd_sn):
                    self._check_alive()
                    await self._window_event().wait()
                self._check_alive()
                pdu = replace(request, cmd_sn=self._cmd_sn, exp_stat_sn=self._exp_stat_sn)
                self._cmd_sn = (self._cmd_sn + 1) & _SN_MASK
                self._send(pdu)
                return await waiter
        except TimeoutError as exc:
            self._fail(f"no answer to a text request within {timeout} s")
            raise CommandTimeoutError(f"{self._where()}: text request timed out") from exc
        finally:
            self._waiters.pop(itt, None)

    async def ping(self) -> None:
        """NOP-Out with a reply wanted (RFC 7143 §11.18); raises PathFailedError when the
        answer does not come within ``nop_timeout_s`` (and fails the connection)."""
        self._check_alive()
        itt = self._next_itt()
        waiter: asyncio.Future[Pdu] = self._new_future()
        self._waiters[itt] = waiter
        try:
            self._send_ping(itt)
            async with asyncio.timeout(self.settings.nop_timeout_s):
                await waiter
        except TimeoutError as exc:
            self._fail(f"no NOP-In within {self.settings.nop_timeout_s} s")
            raise self._failed or PathFailedError("ping timed out") from exc
        finally:
            self._waiters.pop(itt, None)

    def _send_ping(self, itt: int) -> None:
        self._send(
            NopOut(
                itt=itt,
                ttt=RESERVED_TAG,
                cmd_sn=self._cmd_sn,
                exp_stat_sn=self._exp_stat_sn,
                lun=0,
                immediate=True,
            )
        )

    async def _keepalive_loop(self) -> None:
        """Ping when the link has been quiet for ``nop_interval_s``; fail the connection when a
        ping stays unanswered for ``nop_timeout_s``. Runs until the connection ends."""
        interval = self.settings.nop_interval_s
        tick = min(1.0, interval / 2)
        while self.alive:
            await asyncio.sleep(tick)
            now = self._loop.time()
            if self._ping_itt is not None:
                if now - self._ping_sent > self.settings.nop_timeout_s:
                    self._fail(
                        f"no answer to a NOP-Out within {self.settings.nop_timeout_s} s; "
                        "the target is unreachable"
                    )
                continue
            if now - self._last_rx >= interval and self.alive:
                self._ping_itt = self._next_itt()
                self._ping_sent = now
                self._send_ping(self._ping_itt)

    async def logout(self) -> None:
        """Logout (close the session, RFC 7143 §11.14) and close, within
        ``logout_timeout_s``. Never raises: a target that does not answer is just dropped."""
        if not self.alive:
            self.abort("logout of a dead connection")
            return
        itt = self._next_itt()
        waiter: asyncio.Future[Pdu] = self._new_future()
        self._waiters[itt] = waiter
        self.draining = True
        try:
            self._send(
                LogoutRequest(
                    itt=itt,
                    reason=LogoutReason.CLOSE_SESSION,
                    cid=0,
                    cmd_sn=self._cmd_sn,
                    exp_stat_sn=self._exp_stat_sn,
                    immediate=True,
                )
            )
            async with asyncio.timeout(self.settings.logout_timeout_s):
                await waiter
        except (TimeoutError, PathFailedError) as exc:
            log.info("logout from %s did not complete cleanly: %r", self._where(), exc)
        finally:
            self._waiters.pop(itt, None)
            self._close_quietly()

    # ---- what the target sends unasked --------------------------------------------------

    def _on_nop_in(self, pdu: NopIn) -> None:
        if pdu.itt == RESERVED_TAG:
            if pdu.ttt != RESERVED_TAG:
                # RFC 7143 §11.18: answer a target ping with its TTT, ITT 0xffffffff.
                self._send(
                    NopOut(
                        itt=RESERVED_TAG,
                        ttt=pdu.ttt,
                        cmd_sn=self._cmd_sn,
                        exp_stat_sn=self._exp_stat_sn,
                        lun=pdu.lun,
                        immediate=True,
                    )
                )
            return
        self._status_sn(pdu.stat_sn)
        if pdu.itt == self._ping_itt:
            self._ping_itt = None
            return
        self._resolve_waiter(pdu.itt, pdu)

    def _on_async(self, pdu: AsyncMessage) -> None:
        if pdu.async_event in (
            AsyncEvent.LOGOUT_REQUESTED,
            AsyncEvent.CONNECTION_WILL_DROP,
            AsyncEvent.SESSION_WILL_DROP,
        ):
            # RFC 7143 §11.9.1: stop sending new work here; multipath moves to another path
            # and reconnects this one once it is gone.
            log.info("target %s asked us to leave (async event %d)", self._where(),
                     pdu.async_event)  # fmt: skip
            self.draining = True
            if pdu.async_event == AsyncEvent.LOGOUT_REQUESTED:
                self._spawn(self._logout_when_idle(pdu.parameter3))

    async def _logout_when_idle(self, time_to_logout_s: int) -> None:
        # RFC 7143 §11.9.1: Parameter3 is the time the target allows before it logs us out.
        deadline = self._loop.time() + max(1, min(time_to_logout_s, 60))
        while self._tasks and self._loop.time() < deadline and self.alive:
            await asyncio.sleep(0.05)
        await self.logout()
        self._fail("logged out at the target's request")
