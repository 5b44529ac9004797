"""Continuous batching: requests join and leave a running decode batch (the slot engine).

`SlotScheduler` (`processors.slot_scheduler`; settings and records in
`processors.slot_records`) is the synchronous core, driven by one thread. A request is
tokenized and its tiles staged when prepared, then admitted and waits; once a slot is
free its images go through the vision tower (the engine's own path, so the vendor-image
feature cache serves it) and its prompt is prefilled in chunks into a staging row, at
most `prefill_tokens_per_step` prompt tokens between two decode steps, so a burst of
arrivals delays everyone's next token by one chunk at a time rather than by whole
prompts. When its prefill ends it takes a free slot and decodes with the others
(`processors.slot_decoder.SlotDecoder`). Every `steps_per_round` steps the generated ids
come back to the host in one copy; a request leaves at `<|im_end|>`, at the close of the
answer's first JSON object (`stop_at_json_close`), or at its token limit, and its slot
is free for the next round. Steps run past a request's end until the round's copy (at
most `steps_per_round - 1`) are discarded; the slot's context is sized to hold them.

Greedy ids equal those of the engine's one-at-a-time `generate` in float32 (tests on
CPU): each row attends to its own prompt and tokens only, at its own positions.

`SlotEngine` is the streaming interface: `submit` one prepared request, get a
`concurrent.futures.Future` of its `Completion`. It is thread-safe; its queue is bounded
and `submit` blocks (or raises `queue.Full` after its timeout) while the queue is full,
so a producer feeding it slows down to the engine's pace. A preparation thread takes
each submission first (`SlotScheduler.prepare`: tokens, tiles staged in pinned memory,
cache keys) and hands it to the scheduler's thread through a second bounded queue, so
the thread that keeps the GPU fed does no per-request host work beyond queueing it.
`generate(batch)` submits a batch and waits for all of it (the `InferenceEngine`
interface).

Failures flow to the futures: a malformed request (placeholders, pixel shapes, a prompt
that does not fit a slot) fails alone with `ProcessingError(INVALID_REQUEST)`; an error of
the model during a round fails every request in flight with `MODEL_FAILED`, and the engine
goes on with the next requests.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import NativeInternVLEngine, coded_failure
from processors.slot_records import (
    STAGE,
    Completion,
    FinishReason,
    JsonObjectEnd,
    SlotEngineConfig,
    SlotWork,
)
from processors.slot_scheduler import SlotScheduler

__all__ = [
    "Completion",
    "FinishReason",
    "JsonObjectEnd",
    "SlotEngine",
    "SlotEngineConfig",
    "SlotScheduler",
    "SlotWork",
]

log = logging.getLogger(__name__)

_STOP = object()


class SlotEngine:
    """Streaming, thread-safe front of a `SlotScheduler` running on its own thread.

    `load()` loads the wrapped engine, captures the decode graphs and starts the thread;
    `close()` stops it (requests still in flight get `MODEL_FAILED`).
    """

    def __init__(self, engine: NativeInternVLEngine, config: SlotEngineConfig | None = None):
        self.engine = engine
        self.config = config or SlotEngineConfig()
        self._queue: queue.Queue[Any] = queue.Queue(self.config.queue_size)
        # Prepared requests for the scheduler thread: half the staged-tiles bound.
        self._ready: queue.Queue[Any] = queue.Queue(self.config.staged_requests // 2)
        self._thread: threading.Thread | None = None
        self._preparer: threading.Thread | None = None
        self._failure: ProcessingError | None = None  # why the scheduler thread stopped
        self.scheduler: SlotScheduler | None = None
        self._start_lock = threading.Lock()

    @property
    def model_version(self) -> str:
        """The version of the engine's checkpoint."""
        return self.engine.model_version

    def load(self) -> None:
        """Load the model, build the slots, start the scheduler thread; idempotent."""
        with self._start_lock:
            if self._thread is not None:
                return
            self.engine.load()
            self.scheduler = SlotScheduler(self.engine, self.config)
            self._preparer = threading.Thread(
                target=self._prepare_loop, name="slot-prepare", daemon=True
            )
            self._preparer.start()
            self._thread = threading.Thread(target=self._loop, name="slot-engine", daemon=True)
            self._thread.start()

    def submit(
        self,
        request: PreparedRequest,
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        timeout: float | None = None,
    ) -> Future[Completion]:
        """Queue one request; blocks while the queue is full (`queue.Full` after `timeout`)."""
        if self._thread is None:
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED, "slot engine not loaded: call load() first", STAGE
            )
        if self._failure is not None:
            raise self._failure
        future: Future[Completion] = Future()
        item = (request, max_new_tokens, min_new_tokens, time.perf_counter(), future)
        self._queue.put(item, timeout=timeout)
        return future

    def has_room(self) -> bool:
        """Whether `submit` would not block now."""
        return not self._queue.full()

    def generate(self, batch: Sequence[PreparedRequest]) -> list[str]:
        """One text per request, in order (`InferenceEngine`); raises the first failure."""
        futures = [self.submit(request) for request in batch]
        return [future.result().text for future in futures]

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread; requests still in flight fail with `MODEL_FAILED`."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout)
        if self._preparer is not None:
            self._preparer.join(timeout)
        self._thread = self._preparer = None

    # ------------------------------------------------------------------ thread

    def _loop(self) -> None:
        """Admit and run rounds until the stop marker; then fail what is left.

        An unexpected error of the loop itself stops the engine: every request in flight
        or queued fails with `MODEL_FAILED` (none is left waiting) and later submissions
        raise it.
        """
        scheduler = self.scheduler
        assert scheduler is not None
        stopped = False

        def admit() -> None:
            nonlocal stopped
            stopped = stopped or self._admit(scheduler)

        try:
            while not stopped:
                admit()
                if not stopped and not scheduler.idle:
                    self._round(scheduler, admit)
        except Exception as exc:
            log.exception("slot engine: the scheduler thread failed")
            self._failure = ProcessingError(
                ErrorCode.MODEL_FAILED,
                f"slot engine stopped: {type(exc).__name__}: {exc}"[:2000],
                STAGE,
            )
            self._close(scheduler, self._failure)
            return
        self._close(scheduler)

    def _prepare_loop(self) -> None:
        """Prepare each submission in order and hand it over; ends at the stop marker.

        A request the scheduler refuses here (`ProcessingError`, `ValueError`; any other
        error becomes `MODEL_FAILED`) fails its own future; `put` blocks while the
        hand-over queue is full (the staged-tiles bound).
        """
        scheduler = self.scheduler
        assert scheduler is not None
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._ready.put(_STOP)
                return
            request, max_new, min_new, submitted, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with coded_failure(ErrorCode.MODEL_FAILED, f"preparing {request.request_id}"):
                    work = scheduler.prepare(
                        request, max_new_tokens=max_new, min_new_tokens=min_new, submitted=submitted
                    )
            except (ProcessingError, ValueError) as exc:
                future.set_exception(exc)
                continue
            work.future = future
            if self._failure is not None:  # the scheduler thread is gone: nobody takes it
                future.set_exception(self._failure)
                continue
            self._ready.put(work)
            if self._failure is not None:  # it failed while this was handed over
                _fail_all(self._ready, self._failure)

    def _admit(self, scheduler: SlotScheduler) -> bool:
        """Move prepared requests into the scheduler; True once the stop marker was taken.

        Waits briefly for a request only while nothing decodes. A request the scheduler
        refuses (`ProcessingError`; any other error becomes `MODEL_FAILED`) fails its own
        future.
        """
        while scheduler.capacity() > 0:
            try:
                item = self._ready.get(timeout=0.05) if scheduler.idle else self._ready.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            try:
                with coded_failure(ErrorCode.MODEL_FAILED, f"admitting {item.request.request_id}"):
                    scheduler.admit(item)
            except ProcessingError as exc:
                if item.future is not None:
                    item.future.set_exception(exc)
        return False

    def _round(self, scheduler: SlotScheduler, admit: Callable[[], None]) -> None:
        """One round of decode steps; completions and row failures go to their futures.

        `admit` takes the requests prepared during the round, at its end (`run_round`'s
        intake). A failure of the whole round (`MODEL_FAILED`) fails every request in
        flight.
        """
        try:
            with self.engine.lock, coded_failure(ErrorCode.MODEL_FAILED, "generation failed"):
                ended, failed = scheduler.run_round(admit)
        except ProcessingError as exc:
            for work in scheduler.abort():
                if work.future is not None:
                    work.future.set_exception(exc)
            return
        for work, completion in ended:
            if work.future is not None:
                work.future.set_result(completion)
        for work, error in failed:
            if work.future is not None:
                work.future.set_exception(error)

    def _close(self, scheduler: SlotScheduler, error: ProcessingError | None = None) -> None:
        """Fail every request still in flight or queued: the engine is closed (or `error`)."""
        closed = error or ProcessingError(ErrorCode.MODEL_FAILED, "slot engine closed", STAGE)
        for work in scheduler.abort():
            if work.future is not None:
                work.future.set_exception(closed)
        for waiting in (self._ready, self._queue):
            _fail_all(waiting, closed)


def _fail_all(waiting: queue.Queue[Any], error: ProcessingError) -> None:
    """Take everything out of `waiting`; each request in it fails with `error`."""
    while True:
        try:
            item = waiting.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, SlotWork):
            if item.future is not None:
                item.future.set_exception(error)
        elif item is not _STOP and item[-1].set_running_or_notify_cancel():
            item[-1].set_exception(error)
