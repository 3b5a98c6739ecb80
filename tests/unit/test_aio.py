"""blockyard.aio.task_group: a task whose task group lost a child keeps working timeouts
(CPython 3.11.2 left such a task with a cancellation request that turned every later
``asyncio.timeout`` expiry into ``CancelledError``; a replica link then died silently after a
partition, found by ``blockyard chaos``)."""

from __future__ import annotations

import asyncio

import pytest

from blockyard import aio


class _Gone(Exception):
    pass


async def _fail_soon() -> None:
    await asyncio.sleep(0.01)
    raise _Gone


async def _forever() -> None:
    await asyncio.Event().wait()


async def _group_then_timeout() -> str:
    """A group whose child fails while the group waits, then a timeout that expires."""
    with pytest.raises(ExceptionGroup):
        async with aio.task_group() as tg:
            tg.create_task(_fail_soon())
            tg.create_task(_forever())
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    try:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)
    except TimeoutError:
        return "timeout"
    return "no timeout"


def test_a_timeout_after_a_failed_group_is_a_timeout() -> None:
    assert asyncio.run(_group_then_timeout()) == "timeout"


def test_a_cancellation_from_outside_still_cancels() -> None:
    async def main() -> bool:
        started = asyncio.Event()

        async def body() -> None:
            async with aio.task_group() as tg:
                tg.create_task(_forever())
                started.set()

        task = asyncio.create_task(body())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(main())


def test_a_group_that_ends_well_changes_nothing() -> None:
    async def main() -> int:
        async with aio.task_group() as tg:
            tg.create_task(asyncio.sleep(0))
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert asyncio.run(main()) == 0
