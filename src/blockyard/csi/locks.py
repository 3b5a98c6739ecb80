"""One operation at a time per volume or snapshot name.

A second operation on a name that is busy fails at once with
:class:`~blockyard.errors.OperationInProgressError` (CSI: ABORTED) instead of queueing, as the
CSI spec's concurrency section allows: the CO retries with backoff. Not thread-safe: use it from
one event loop, where the check and the claim happen without an await in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from blockyard.errors import OperationInProgressError, ServerUnavailableError

#: Names claimed at once; more means the CO is flooding the driver.
MAX_CLAIMED_NAMES: Final = 4096


class OperationLocks:
    def __init__(self, max_claimed: int = MAX_CLAIMED_NAMES) -> None:
        self._busy: dict[str, str] = {}
        self._max_claimed = max_claimed

    @contextmanager
    def claim(self, operation: str, *keys: str) -> Iterator[None]:
        """Claim every key (``volume:<id>``, ``snapshot:<name>``) for ``operation`` or none."""
        for key in keys:
            holder = self._busy.get(key)
            if holder is not None:
                raise OperationInProgressError(
                    f"{holder} on {key} is still in progress; retry once it has finished"
                )
        if len(self._busy) + len(keys) > self._max_claimed:
            raise ServerUnavailableError(
                f"more than {self._max_claimed} CSI operations in flight; retry later"
            )
        unique = dict.fromkeys(keys)
        for key in unique:
            self._busy[key] = operation
        try:
            yield
        finally:
            for key in unique:
                del self._busy[key]

    def busy(self, key: str) -> bool:
        return key in self._busy
