"""Liveness, readiness and graceful shutdown of a worker.

Readiness needs all of: the broker answered recently (the consumer-lag refresh, a
metadata round trip, doubles as the probe), partitions are assigned, the models
(or the sink's ClickHouse) are loaded. Every check reads cached state: views run on
the worker's event loop and must not block.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import faust
from faust.exceptions import NotReady

log = logging.getLogger(__name__)


class WorkerHealth:
    """The `HealthSource` of one worker (see `streams.web`)."""

    def __init__(self, app: faust.App, runtime: Any, *, role: str, broker_timeout_s: float) -> None:
        self._app = app
        self._runtime = runtime
        self._role = role
        self._broker_timeout_s = broker_timeout_s
        self._started = time.monotonic()
        self._broker_seen: float | None = None

    def broker_answered(self, ok: bool) -> None:
        """Record the outcome of the latest broker round trip."""
        if ok:
            self._broker_seen = time.monotonic()
        else:
            self._broker_seen = None

    def _partitions(self) -> int:
        try:
            return len(self._app.consumer.assignment())
        except NotReady:  # ConsumerNotStarted: the worker is still starting
            return 0

    def liveness(self) -> dict[str, Any]:
        """The role and uptime; never raises."""
        return {"role": self._role, "uptime_s": round(time.monotonic() - self._started, 1)}

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """Whether the worker takes work, and each check by name (cached state only)."""
        seen = self._broker_seen
        broker = seen is not None and time.monotonic() - seen < self._broker_timeout_s
        loaded = self._runtime.ready.is_set() and self._runtime.failed is None
        checks = {
            "broker_connected": broker,
            "partitions_assigned": self._partitions() > 0,
            "models_loaded": loaded if self._role == "inference" else True,
            "sink_reachable": self._runtime.sink_reachable() if self._role == "sink" else True,
            "sink_accepting_rows": (
                self._runtime.sink_accepting_rows() if self._role == "sink" else True
            ),
        }
        return all(checks.values()), checks


class GracefulWorker(faust.Worker):
    """faust's worker with a bounded, interruptible shutdown.

    First SIGTERM/SIGINT: faust stops taking new batches, finishes and acknowledges
    the batch in flight, commits and leaves the group. If that takes longer than
    `VS_SHUTDOWN_TIMEOUT_S` (read by the app at start-up and passed as
    `shutdown_timeout_s`), or a second signal arrives, the process exits at once:
    at-least-once delivery makes that safe (unacknowledged inputs are redelivered).
    """

    shutdown_timeout_s: float = 30.0

    def _schedule_shutdown(self, signal_: signal.Signals) -> None:
        if getattr(self, "_signal_stop_time", None):
            log.warning(
                "second %s: exiting now without waiting for the batch in flight", signal_.name
            )
            os._exit(128 + int(signal_))
        log.info(
            "%s: finishing the batch in flight, then leaving (at most %.0fs)",
            signal_.name,
            self.shutdown_timeout_s,
        )
        self.loop.call_later(self.shutdown_timeout_s, self._shutdown_overdue)
        super()._schedule_shutdown(signal_)

    def _shutdown_overdue(self) -> None:
        log.error("shutdown took longer than %.0fs; exiting now", self.shutdown_timeout_s)
        os._exit(1)
