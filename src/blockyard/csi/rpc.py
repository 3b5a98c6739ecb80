"""The wrapper every CSI handler runs in: one log line per RPC with its outcome and duration,
errors turned into a status in this one place (:func:`blockyard.csi.status.csi_status_for`),
and the outcome reported to :class:`~blockyard.csi.metrics.Metrics`."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from blockyard.csi.metrics import Metrics, NoMetrics
from blockyard.csi.status import csi_status_for
from blockyard.errors import BlockyardError

log = logging.getLogger("blockyard.csi")

R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]


class RpcRunner:
    """Runs handlers of one CSI service (``Identity``, ``Controller`` or ``Node``)."""

    def __init__(self, service: str, metrics: Metrics | None = None) -> None:
        self.service = service
        self.metrics: Metrics = metrics or NoMetrics()

    async def run(
        self, context: Context, method: str, subject: str, work: Callable[[], Awaitable[R]]
    ) -> R:
        """Await ``work()`` and return its answer, or abort the RPC with the status of the
        error it raised. ``subject`` names what the call is about (volume, snapshot, node)."""
        start = time.monotonic()
        try:
            result = await work()
        except BlockyardError as exc:
            code, message = csi_status_for(exc), str(exc)
        except Exception as exc:  # a bug still answers with a status; the log keeps the cause
            log.exception("%s %s %s failed unexpectedly", self.service, method, subject)
            code = grpc.StatusCode.INTERNAL
            message = (
                f"internal error in the blockyard CSI driver ({type(exc).__name__}: {exc}); "
                "the driver log has the details. Retrying is safe"
            )
        else:
            elapsed_s = time.monotonic() - start
            log.info("csi %s %s OK %.1f ms", method, subject, elapsed_s * 1e3)
            self.metrics.rpc_finished(self.service, method, grpc.StatusCode.OK, elapsed_s)
            return result
        elapsed_s = time.monotonic() - start
        log.info("csi %s %s %s %.1f ms: %s", method, subject, code.name, elapsed_s * 1e3, message)
        self.metrics.rpc_finished(self.service, method, code, elapsed_s)
        await context.abort(code, message)
