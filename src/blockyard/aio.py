"""asyncio helpers that work around defects of the CPython this project runs on (3.11.2,
Debian 12's)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """``asyncio.TaskGroup``, leaving its task's cancellation count as it found it.

    On 3.11.2, when a child fails while the group waits in ``__aexit__``, the group cancels
    its own task to wake it and never takes that request back (``uncancel``; fixed in 3.12).
    3.11's ``asyncio.timeout`` turns its expiry into ``TimeoutError`` only when the count is
    then 0, so from there on every timeout that expires in that task raises
    ``CancelledError`` instead — and a reconnect loop that catches ``Exception`` ends, silently.
    A real cancellation from outside (the group exits with ``CancelledError``) is left alone.
    """
    task = asyncio.current_task()
    assert task is not None, "a task group runs inside a task"
    before = task.cancelling()
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except asyncio.CancelledError:
        raise
    except BaseException:
        _restore(task, before)
        raise
    _restore(task, before)


def _restore(task: asyncio.Task[object], cancelling: int) -> None:
    while task.cancelling() > cancelling:
        task.uncancel()
