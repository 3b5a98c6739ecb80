"""The value types an initiator connection works with: :class:`InitiatorSettings` (how it logs
in and how long it waits), :class:`CommandOutcome` (what a completed command returns), the
per-command :class:`_Task` record, and the small helpers and serial-number mask the
connection's parts share; for type checking only, the connection state its mixins share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockyard.attach.initiator.scsi import Sense
from blockyard.iscsi.chap import ChapCredentials
from blockyard.iscsi.negotiation import (
    DIGEST_CRC32C,
    DIGEST_NONE,
    OperationalSettings,
)

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from blockyard.iscsi.pdu import Pdu

_SN_MASK = 0xFFFFFFFF  # RFC 7143 §4.2.2.1: 32-bit serial numbers


@dataclass(frozen=True, slots=True)
class InitiatorSettings:
    """How the initiator logs in and how long it waits. All times in seconds.

    ``initiator_name`` is our IQN; ``chap`` our CHAP credentials, ``target_chap`` what the
    target must prove (mutual CHAP). Digests are requested (CRC32C preferred, None accepted)
    when the flags are set. ``queue_depth`` bounds commands outstanding per connection (the
    target's CmdSN window bounds them too). ``command_timeout_s`` is per command attempt.
    """

    initiator_name: str
    chap: ChapCredentials | None = None
    target_chap: ChapCredentials | None = None
    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 262144
    max_burst_length: int = 1 << 20
    first_burst_length: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = False
    queue_depth: int = 64
    connect_timeout_s: float = 5.0
    login_timeout_s: float = 10.0
    command_timeout_s: float = 30.0
    tmf_timeout_s: float = 5.0
    logout_timeout_s: float = 5.0
    nop_interval_s: float = 5.0
    nop_timeout_s: float = 10.0
    initiator_alias: str = ""

    def __post_init__(self) -> None:
        if self.queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        timers = (
            self.connect_timeout_s,
            self.login_timeout_s,
            self.command_timeout_s,
            self.tmf_timeout_s,
            self.logout_timeout_s,
            self.nop_interval_s,
            self.nop_timeout_s,
        )
        if min(timers) <= 0:
            raise ValueError("every timeout and interval must be positive")

    def operational(self) -> OperationalSettings:
        def digests(on: bool) -> tuple[str, ...]:
            return (DIGEST_CRC32C, DIGEST_NONE) if on else (DIGEST_NONE,)

        return OperationalSettings(
            header_digests=digests(self.header_digest),
            data_digests=digests(self.data_digest),
            initial_r2t=self.initial_r2t,
            immediate_data=self.immediate_data,
            max_recv_data_segment_length=self.max_recv_data_segment_length,
            max_burst_length=self.max_burst_length,
            first_burst_length=min(self.first_burst_length, self.max_burst_length),
        )


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """A command the target completed. ``data`` holds Data-In when the caller gave no buffer;
    ``transferred`` counts Data-In bytes placed (in ``data`` or the caller's buffer)."""

    status: int
    sense: Sense | None
    data: bytes = b""
    transferred: int = 0


@dataclass(slots=True, eq=False)
class _Task:
    itt: int
    cmd_sn: int
    lun: int
    buffer: memoryview | None
    data_out: memoryview | None
    future: asyncio.Future[CommandOutcome]
    owns_buffer: bool = False
    received: int = 0
    aborting: bool = False
    #: Fast-path tasks (:meth:`~blockyard.attach.initiator.connection.IscsiConnection.
    #: start_command`): called synchronously when the task ends (not after a timeout or
    #: cancellation), and when its deadline passes.
    on_done: Callable[[_Task], None] | None = None
    on_timeout: Callable[[_Task], None] | None = None
    deadline: float = 0.0


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _broadcast(event: asyncio.Event) -> asyncio.Event:
    """Wake everyone waiting on ``event`` and return a fresh one for the next change."""
    event.set()
    return asyncio.Event()


if TYPE_CHECKING:

    class _ConnectionParts:
        """What both mixins of :class:`~blockyard.attach.initiator.connection.IscsiConnection`
        use of it (the connection defines all of it); each mixin declares what only it uses.
        At run time the mixins derive from ``object`` instead."""

        settings: InitiatorSettings
        _loop: asyncio.AbstractEventLoop
        _cmd_sn: int
        _exp_stat_sn: int
        _max_cmd_sn: int
        _tasks: dict[int, _Task]

        def _check_alive(self) -> None: ...
        def _where(self) -> str: ...
        def _next_itt(self) -> int: ...
        def _send(self, pdu: Pdu) -> None: ...
        def _status_sn(self, stat_sn: int) -> None: ...
        def _window_event(self) -> asyncio.Event: ...
        def _new_future(self) -> asyncio.Future[Any]: ...
        def _spawn(self, coro: Coroutine[object, object, None]) -> None: ...


__all__ = ["CommandOutcome", "InitiatorSettings"]
