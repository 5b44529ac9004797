"""Continuous batching: requests join and leave a running decode batch (the slot engine).

`SlotScheduler` is the synchronous core, driven by one thread. A request is tokenized
when added and waits; once a slot is free its images go through the vision tower (the
engine's own path, so the vendor-image feature cache serves it) and its prompt is
prefilled in chunks into a staging row, at most `prefill_tokens_per_step` prompt tokens
between two decode steps, so a burst of arrivals delays everyone's next token by one
chunk at a time rather than by whole prompts. When its prefill ends it takes a free slot
and decodes with the others (`processors.slot_decoder.SlotDecoder`). Every
`steps_per_round` steps the generated ids come back to the host in one copy; a request
leaves at `<|im_end|>`, at the close of the answer's first JSON object
(`stop_at_json_close`), or at its token limit, and its slot is free for the next round.
Steps run past a request's end until the round's copy (at most `steps_per_round - 1`)
are discarded; the slot's context is sized to hold them.

Greedy ids equal those of the engine's one-at-a-time `generate` in float32 (tests on
CPU): each row attends to its own prompt and tokens only, at its own positions.

`SlotEngine` is the streaming interface: `submit` one prepared request, get a
`concurrent.futures.Future` of its `Completion`. It is thread-safe; its queue is bounded
and `submit` blocks (or raises `queue.Full` after its timeout) while the queue is full, so
a producer feeding it slows down to the engine's pace. `generate(batch)` submits a batch
and waits for all of it (the `InferenceEngine` interface).

Failures flow to the futures: a malformed request (placeholders, pixel shapes, a prompt
that does not fit a slot) fails alone with `ProcessingError(INVALID_REQUEST)`; an error of
the model during a round fails every request in flight with `MODEL_FAILED`, and the engine
goes on with the next requests.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import IM_END_TOKEN, NativeInternVLEngine, coded_failure
from processors.slot_decoder import SlotDecoder

STAGE = "model"
FinishReason = Literal["eos", "json", "length"]


@dataclass(frozen=True, slots=True)
class SlotEngineConfig:
    """Sizes and policy of the slot engine.

    Attributes:
        slots: rows of the KV cache decoded together; 0 sizes them from free GPU memory
            (`memory_fraction` of it) on CUDA, 16 on CPU.
        context_length: columns per slot (prompt + answer + one round of overshoot);
            0: 4096 + the engine's max_new_tokens, rounded up to 128.
        prefill_tokens_per_step: prompt tokens prefilled between two decode steps (whole
            prompts batched; a longer prompt is prefilled in chunks of this size).
        steps_per_round: decode steps between two copies of the new ids to the host.
        queue_size: submissions waiting for the scheduler before `submit` blocks.
        stop_at_json_close: a request also ends when its first JSON object closes.
        memory_fraction: share of free GPU memory the slots may take when `slots` is 0.
        max_slots: upper bound of the automatic slot count.
        prefill_rows: whole prompts prefilled together in one call (staging rows).
        vision_requests: waiting requests whose images go through the vision tower in one
            call (each of them has a free slot ahead of it).
    """

    slots: int = 0
    context_length: int = 0
    prefill_tokens_per_step: int = 8192
    steps_per_round: int = 16
    queue_size: int = 256
    stop_at_json_close: bool = True
    memory_fraction: float = 0.5
    max_slots: int = 512
    vision_requests: int = 8
    prefill_rows: int = 8

    def __post_init__(self) -> None:
        for name in ("slots", "context_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "prefill_tokens_per_step",
            "steps_per_round",
            "queue_size",
            "max_slots",
            "vision_requests",
            "prefill_rows",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True, slots=True)
class Completion:
    """The answer of one request: decoded text, its new token ids and why it ended.

    `queued_s` is the time from `submit` until a slot started on it (vision and prefill);
    `total_s` the time from `submit` until the answer was done.
    """

    request_id: str
    attempt: int
    text: str
    token_ids: tuple[int, ...]
    finish: FinishReason
    queued_s: float = 0.0
    total_s: float = 0.0


class JsonObjectEnd:
    """Watches generated text; `feed` returns True once the first JSON object closes.

    Counts braces outside double-quoted strings (escapes honoured) from the first `{`.
    """

    __slots__ = ("depth", "escape", "in_string")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False

    def feed(self, text: str) -> bool:
        for char in text:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif char == "\\":
                    self.escape = True
                elif char == '"':
                    self.in_string = False
            elif char == '"' and self.depth:
                self.in_string = True
            elif char == "{":
                self.depth += 1
            elif char == "}" and self.depth:
                self.depth -= 1
                if not self.depth:
                    return True
        return False


@dataclass(eq=False)
class _Work:
    """Host-side state of one request in the scheduler."""

    request: PreparedRequest
    ids: list[int]
    max_new: int
    min_new: int
    submitted: float
    json: JsonObjectEnd | None
    future: Future[Completion] | None = None
    features: Any = None  # (image tokens, hidden) on the device, during prefill
    done: int = 0  # prompt tokens prefilled
    images_done: int = 0  # image tokens prefilled
    activated_step: int = 0
    first: Any = None  # the first token (device), until the next copy to the host
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0
    vision_ready: bool = False

    def extend(self, new: Sequence[int], eos: int, texts: Sequence[str]) -> FinishReason | None:
        """Append new ids up to the first stop; returns why the request ended, if it did."""
        for token, text in zip(new, texts, strict=True):
            if token == eos:
                return "eos"
            self.tokens.append(token)
            if len(self.tokens) >= self.max_new:
                return "length"
            if self.json is not None and self.json.feed(text) and len(self.tokens) >= self.min_new:
                return "json"
        return None


class SlotScheduler:
    """Admission, chunked prefill and decode rounds over a `SlotDecoder` (one thread).

    `add` tokenizes and validates a request (raises `ProcessingError(INVALID_REQUEST)`);
    `run_round` does up to `steps_per_round` decode steps, each after at most one prefill
    budget, and returns the requests that ended in it with their completions.
    """

    def __init__(self, engine: NativeInternVLEngine, config: SlotEngineConfig) -> None:
        base = engine._decoder
        if base is None or not engine.loaded:
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                "the slot engine needs a loaded native engine on the static decode path",
                STAGE,
            )
        self.engine = engine
        self.config = config
        self.tokenizer = engine._tokenizer
        self.eos_id = engine._im_end_id
        self.context_id = engine._context_id
        context = config.context_length or -(-(4096 + engine.config.max_new_tokens) // 128) * 128
        slots = config.slots or self._auto_slots(engine, base, context)
        self.decoder = SlotDecoder(
            base,
            slots=slots,
            context=context,
            steps_per_round=config.steps_per_round,
            cuda_graphs=engine.config.cuda_graphs,
            compile_step=engine.config.compile_decode and engine.device.startswith("cuda"),
            stage_rows=config.prefill_rows,
        )
        self.waiting: deque[_Work] = deque()
        self.prefilling: _Work | None = None
        self.rows: list[_Work] = []  # row index -> request
        self.steps = 0  # decode steps so far
        self._vision_done: Any = None  # CUDA event after the last vision call
        # Counters for benchmarks: decode steps, rows decoded (active and padded), prompt
        # tokens prefilled, requests through the vision tower, rounds.
        self.stats = dict.fromkeys(
            ("steps", "active_rows", "padded_rows", "prefill_tokens", "vision", "rounds"), 0
        )
        import torch

        with torch.inference_mode():
            self.decoder.capture_graphs()

    def _auto_slots(self, engine: NativeInternVLEngine, base: Any, context: int) -> int:
        if not engine.device.startswith("cuda"):
            return 16
        import torch

        free, _ = torch.cuda.mem_get_info(engine.device)
        per_slot = SlotDecoder.bytes_per_slot(base, context)
        return max(
            1, min(self.config.max_slots, int(free * self.config.memory_fraction) // per_slot)
        )

    @property
    def slots(self) -> int:
        return self.decoder.slots

    @property
    def idle(self) -> bool:
        return not (self.rows or self.waiting or self.prefilling)

    def capacity(self) -> int:
        """How many more requests may be added now (one wait per free slot)."""
        busy = len(self.rows) + len(self.waiting) + (self.prefilling is not None)
        return max(0, self.slots - busy)

    def in_flight(self) -> list[_Work]:
        current = [self.prefilling] if self.prefilling is not None else []
        return [*self.rows, *current, *self.waiting]

    # --------------------------------------------------------------- admission

    def add(
        self,
        request: PreparedRequest,
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        submitted: float | None = None,
    ) -> _Work:
        """Tokenize and queue a request; raises `ProcessingError(INVALID_REQUEST)` if it is bad."""
        max_new = max_new_tokens or self.engine.config.max_new_tokens
        min_new = self.engine.config.min_new_tokens if min_new_tokens is None else min_new_tokens
        if not 0 <= min_new <= max_new:
            raise ValueError(f"min_new_tokens {min_new} not in [0, max_new_tokens {max_new}]")
        with coded_failure(ErrorCode.INVALID_REQUEST, f"request {request.request_id}"):
            ids = self.engine._encode_all([request])[0]
        needed = len(ids) + max_new + self.config.steps_per_round
        if needed > self.decoder.context:
            raise ProcessingError(
                ErrorCode.INVALID_REQUEST,
                f"request {request.request_id}: {len(ids)} prompt tokens + {max_new} new "
                f"tokens do not fit a slot of {self.decoder.context} columns",
                STAGE,
            )
        work = _Work(
            request,
            ids,
            max_new,
            min_new,
            time.perf_counter() if submitted is None else submitted,
            JsonObjectEnd() if self.config.stop_at_json_close else None,
        )
        self.waiting.append(work)
        return work

    def _vision(self, works: list[_Work]) -> list[tuple[_Work, ProcessingError]]:
        """Queue the vision work of `works` in one call (feature cache first).

        Returns the requests whose feature count does not match their image tokens.
        """
        import torch

        engine = self.engine
        if self._vision_done is not None:
            # The engine reuses one pinned host buffer: the last copy out of it must be done.
            self._vision_done.synchronize()
        with coded_failure(ErrorCode.MODEL_FAILED, "vision failed"):
            features_of = engine._image_features([work.request for work in works])
        if engine.device.startswith("cuda"):
            self._vision_done = torch.cuda.Event()
            self._vision_done.record()
        failed = []
        now = time.perf_counter()
        for work, features in zip(works, features_of, strict=True):
            work.vision_ready = True
            work.started = now
            image_tokens = work.ids.count(self.context_id)
            count = sum(int(part.shape[0]) * int(part.shape[1]) for part in features)
            if count != image_tokens:
                failed.append(
                    (
                        work,
                        ProcessingError(
                            ErrorCode.INVALID_REQUEST,
                            f"request {work.request.request_id}: {count} image features for "
                            f"{image_tokens} image tokens",
                            STAGE,
                        ),
                    )
                )
            elif features:
                hidden = int(features[0].shape[-1])
                work.features = torch.cat([part.reshape(-1, hidden) for part in features])
        self.stats["vision"] += len(works)
        return failed

    def _take_next(
        self, pop: bool = True
    ) -> tuple[_Work | None, list[tuple[_Work, ProcessingError]]]:
        """The next waiting request, its vision done (with that of a few after it)."""
        failed: list[tuple[_Work, ProcessingError]] = []
        while self.waiting:
            work = self.waiting[0]
            if not work.vision_ready:
                free = self.slots - len(self.rows)
                group = [w for w in list(self.waiting)[: max(1, free)] if not w.vision_ready]
                bad = self._vision(group[: self.config.vision_requests])
                for item in bad:
                    self.waiting.remove(item[0])
                failed.extend(bad)
                continue
            return (self.waiting.popleft() if pop else work), failed
        return None, failed

    def _prefill_step(self) -> list[tuple[_Work, ProcessingError]]:
        """Prefill up to the per-step budget; activate requests whose prompt is done.

        Whole prompts that fit the budget are prefilled together (up to the staging
        rows); a prompt longer than the budget goes in chunks, one chunk per step.
        """
        failed: list[tuple[_Work, ProcessingError]] = []
        budget = self.config.prefill_tokens_per_step
        while budget > 0:
            if self.prefilling is not None:
                budget -= self._prefill_chunk(self.prefilling, budget)
                continue
            group: list[_Work] = []
            tokens = 0
            work: _Work | None = None
            while len(self.rows) + len(group) < self.slots and len(group) < self.decoder.stage_rows:
                work, bad = self._take_next(pop=False)
                failed.extend(bad)
                if work is None or tokens + len(work.ids) > budget:
                    break
                group.append(self.waiting.popleft())
                tokens += len(work.ids)
            if not group:
                full_budget = self.config.prefill_tokens_per_step
                if work is None or len(self.rows) >= self.slots or len(work.ids) <= full_budget:
                    break  # nothing waits, no slot is free, or it fits the next step whole
                self.prefilling = self.waiting.popleft()  # longer than any budget: chunks
                continue
            self._prefill_group(group)
            budget -= tokens
        return failed

    def _prefill_group(self, group: list[_Work]) -> None:
        import torch

        parts = [work.features for work in group if work.features is not None]
        features = torch.cat(parts) if parts else None
        first = self.decoder.prefill_rows(
            [work.ids for work in group], features, [work.min_new for work in group]
        )
        for stage, work in enumerate(group):
            self._activate(work, first[stage : stage + 1], stage)
        self.stats["prefill_tokens"] += sum(len(work.ids) for work in group)

    def _prefill_chunk(self, work: _Work, budget: int) -> int:
        """The next chunk (at most `budget` tokens) of a long prompt; returns its size."""
        take = min(budget, len(work.ids) - work.done)
        chunk = work.ids[work.done : work.done + take]
        images = chunk.count(self.context_id)
        features = None
        if images:
            features = work.features[work.images_done : work.images_done + images]
        last = work.done + take == len(work.ids)
        input_ids = self.decoder.to_device([chunk], pad=self.eos_id)
        first = self.decoder.prefill_chunk(input_ids, work.done, features, last, work.min_new)
        work.done += take
        work.images_done += images
        self.stats["prefill_tokens"] += take
        if last:
            self._activate(work, first, 0)
            self.prefilling = None
        return take

    def _activate(self, work: _Work, first: Any, stage: int) -> None:
        row = len(self.rows)
        self.decoder.activate(row, len(work.ids), first, work.min_new, stage)
        work.first = first
        work.features = None
        work.activated_step = self.steps
        self.rows.append(work)

    # ----------------------------------------------------------------- rounds

    def run_round(
        self,
    ) -> tuple[list[tuple[_Work, Completion]], list[tuple[_Work, ProcessingError]]]:
        """Up to `steps_per_round` steps; returns (ended requests, failed requests)."""
        import torch

        with torch.inference_mode():
            return self._round()

    def _round(self) -> tuple[list[tuple[_Work, Completion]], list[tuple[_Work, ProcessingError]]]:
        import torch

        decoder = self.decoder
        decoder.begin_round()
        first_step = self.steps
        failed: list[tuple[_Work, ProcessingError]] = []
        done = 0
        while done < self.config.steps_per_round:
            failed.extend(self._prefill_step())
            if not self.rows:
                if self.prefilling is None and not self.waiting:
                    break
                continue
            decoder.step(len(self.rows))
            self.steps += 1
            done += 1
            self.stats["active_rows"] += len(self.rows)
            self.stats["padded_rows"] += decoder.batch_for(len(self.rows))
        if not self.rows:
            return [], failed
        self.stats["steps"] += done
        self.stats["rounds"] += 1
        count = len(self.rows)
        firsts = [work.first for work in self.rows if work.first is not None]
        flat = decoder.round_out[:count, :done].reshape(-1)
        if firsts:
            flat = torch.cat([flat, *firsts])
        host: list[int] = flat.tolist()
        first_ids = iter(host[count * done :])
        texts_of = self.tokenizer.convert_ids_to_tokens if self.config.stop_at_json_close else None
        ended: list[tuple[int, _Work, FinishReason]] = []
        for row, work in enumerate(self.rows):
            new: list[int] = []
            if work.first is not None:
                new.append(next(first_ids))
                work.first = None
            begin = max(0, work.activated_step - first_step)
            new.extend(host[row * done + begin : (row + 1) * done])
            texts = texts_of(new) if texts_of is not None else [""] * len(new)
            reason = work.extend(new, self.eos_id, texts)
            if reason is not None:
                ended.append((row, work, reason))
        now = time.perf_counter()
        completions = []
        for row, work, reason in sorted(ended, key=lambda item: -item[0]):
            last = len(self.rows) - 1
            columns = len(self.rows[last].ids) + self.steps - self.rows[last].activated_step
            decoder.move(last, row, columns)
            self.rows[row] = self.rows[last]
            self.rows.pop()
            completions.append((work, self._completion(work, reason, now)))
        return completions[::-1], failed

    def _completion(self, work: _Work, reason: FinishReason, now: float) -> Completion:
        text = self.tokenizer.decode(work.tokens, skip_special_tokens=True)
        return Completion(
            work.request.request_id,
            work.request.attempt,
            text.split(IM_END_TOKEN)[0].strip(),
            tuple(work.tokens),
            reason,
            queued_s=work.started - work.submitted,
            total_s=now - work.submitted,
        )

    def abort(self) -> list[_Work]:
        """Drop every request in flight (after a model failure); returns them."""
        dropped = self.in_flight()
        for row in range(len(self.rows)):
            self.decoder.release(row)
        self.rows.clear()
        self.waiting.clear()
        self.prefilling = None
        return dropped


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
        self._thread: threading.Thread | None = None
        self.scheduler: SlotScheduler | None = None
        self._start_lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self.engine.model_version

    def load(self) -> None:
        """Load the model, build the slots, start the scheduler thread; idempotent."""
        with self._start_lock:
            if self._thread is not None:
                return
            self.engine.load()
            self.scheduler = SlotScheduler(self.engine, self.config)
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
        self._thread = None

    # ------------------------------------------------------------------ thread

    def _loop(self) -> None:
        scheduler = self.scheduler
        assert scheduler is not None
        stopping = False
        while not stopping:
            while scheduler.capacity() > 0:
                try:
                    item = (
                        self._queue.get(timeout=0.05)
                        if scheduler.idle
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                request, max_new, min_new, submitted, future = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    work = scheduler.add(
                        request, max_new_tokens=max_new, min_new_tokens=min_new, submitted=submitted
                    )
                except (ProcessingError, ValueError) as exc:
                    future.set_exception(exc)
                    continue
                work.future = future
            if stopping:
                break
            if scheduler.idle:
                continue
            try:
                with self.engine._lock, coded_failure(ErrorCode.MODEL_FAILED, "generation failed"):
                    ended, failed = scheduler.run_round()
            except ProcessingError as exc:
                for work in scheduler.abort():
                    if work.future is not None:
                        work.future.set_exception(exc)
                continue
            for work, completion in ended:
                if work.future is not None:
                    work.future.set_result(completion)
            for work, error in failed:
                if work.future is not None:
                    work.future.set_exception(error)
        closed = ProcessingError(ErrorCode.MODEL_FAILED, "slot engine closed", STAGE)
        for work in scheduler.abort():
            if work.future is not None:
                work.future.set_exception(closed)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[-1].set_exception(closed)
