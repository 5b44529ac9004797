"""A test-only submitting engine whose completions finish out of order.

Should only be used for testing. `OutOfOrderEngine` is a `ReplayEngine` (recorded outputs
per request uuid and attempt, so the worker builds its pipeline in replay mode: no image
is fetched) with the slot engine's streaming interface: `submit` puts a request on a
bounded queue (`queue.Full` after `timeout` while it is full), and a thread of its own
takes at most `slots` of them at a time and resolves each after `delay_s(request)`
seconds, so a later request with a short delay finishes before an earlier, slower one.
`completed` records the (request id, attempt) of every answer in completion order.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from processors.errors import ProcessingError
from processors.inference import PreparedRequest, ReplayEngine


@dataclass(frozen=True)
class FakeCompletion:
    request_id: str
    attempt: int
    text: str


class OutOfOrderEngine(ReplayEngine):
    def __init__(
        self,
        outputs: Mapping[str, Sequence[str]],
        delay_s: Callable[[PreparedRequest], float],
        *,
        slots: int = 8,
        queue_size: int = 4,
        version: str = "out-of-order:test",
    ) -> None:
        super().__init__(outputs, version)
        self._delay_s = delay_s
        self._slots = slots
        self._queue: queue.Queue[tuple[PreparedRequest, Future[FakeCompletion]]] = queue.Queue(
            queue_size
        )
        self.completed: list[tuple[str, int]] = []
        self.submitted: list[tuple[str, int]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def load(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def has_room(self) -> bool:
        return not self._queue.full()

    def submit(
        self, request: PreparedRequest, *, timeout: float | None = None
    ) -> Future[FakeCompletion]:
        future: Future[FakeCompletion] = Future()
        self._queue.put((request, future), timeout=timeout)
        self.submitted.append((request.request_id, request.attempt))
        return future

    def _loop(self) -> None:
        held: list[tuple[float, int, PreparedRequest, Future[FakeCompletion]]] = []
        order = itertools.count()
        while not self._stop.is_set():
            while len(held) < self._slots:
                try:
                    wait = 0.005 if held else 0.05
                    request, future = self._queue.get(timeout=wait)
                except queue.Empty:
                    break
                due = time.monotonic() + self._delay_s(request)
                heapq.heappush(held, (due, next(order), request, future))
            now = time.monotonic()
            while held and held[0][0] <= now:
                _, _, request, future = heapq.heappop(held)
                try:
                    text = super().generate([request])[0]
                except ProcessingError as exc:
                    future.set_exception(exc)
                    continue
                self.completed.append((request.request_id, request.attempt))
                future.set_result(FakeCompletion(request.request_id, request.attempt, text))
            if held and len(held) >= self._slots:
                time.sleep(max(0.0, min(0.005, held[0][0] - time.monotonic())))

    def generate(self, batch: Sequence[PreparedRequest]) -> list[str]:
        futures = [self.submit(request) for request in batch]
        return [future.result().text for future in futures]


def reversed_delays(base_s: float, step_s: float, period: int) -> Callable[[Any], float]:
    """Delays that fall with the request number (`req-00042` → 42): within each `period`
    consecutive requests the later ones finish first."""

    def delay(request: PreparedRequest) -> float:
        number = int(request.request_id.rsplit("-", 1)[-1])
        return base_s + step_s * (period - 1 - number % period)

    return delay
