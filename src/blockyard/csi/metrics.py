"""The seam for CSI metrics: every RPC reports its outcome here once it has finished.

Prometheus export is a later step; until then :class:`NoMetrics` drops everything.
"""

from __future__ import annotations

from typing import Protocol

import grpc


class Metrics(Protocol):
    def rpc_finished(
        self, service: str, method: str, code: grpc.StatusCode, duration_s: float
    ) -> None:
        """Called once per RPC from the event loop; must not block."""
        ...


class NoMetrics:
    """The default :class:`Metrics`: records nothing."""

    def rpc_finished(
        self, service: str, method: str, code: grpc.StatusCode, duration_s: float
    ) -> None:
        return None
