"""Return verification for one micro-batch: requests in, decisions or failures out.

The former service's per-request flow (docs/former-service.md) reshaped for batches:

1. parse each request's questions (a bad one fails only that request);
2. gather every image of the batch concurrently (`ImageSource`), then tile off the event
   loop; in replay mode (`images=None`) nothing is fetched and each image counts as one tile;
3. build the prompts and make ONE `engine.generate` call for all first attempts; each
   request carries its own answer schema (`processors.answer_schema`), which an engine
   that constrains its decoding keeps the answer inside (the InternVL static path), so
   the retry below is for the engines that do not (replay, remote code, "generate");
   with a `SubmittingEngine` (the slot engine) each request is submitted on its own
   instead, and none waits for the others;
4. parse and validate every answer; make ONE more call, with the stricter prompt
   (`strict=True`, attempt 2), for every request whose first answer was unreadable (with
   a `SubmittingEngine`, a new submission of that request);
5. decide the valid ones (`processors.decision.decide`).

Failures are data: every input yields exactly one `VerificationOutcome`, in input order,
holding either a decision or a `Failure`. If the engine raises for a whole call, it is
called again per request (`processors.batching.run_isolated`), so one bad request cannot
sink the batch; a request whose own call raises fails with MODEL_FAILED (or the engine's
own `ProcessingError` code). A request unreadable twice fails with MODEL_OUTPUT_INVALID
and keeps both raw outputs.

Phases are timed once per batch: `on_phase` (the worker's metrics) is told the wall time
of gathering, tiling, all model calls of the batch together, and deciding.

Every model attempt that produced text is recorded as a `VerificationAttempt`; engine
failures produce no attempt record (the failure itself is the record).

Nothing here touches Kafka, faust or the environment; `processors.replay` runs the same
pipeline over recorded model outputs (no GPU, no network).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from processors.answer_parsing import parse_answer
from processors.answer_schema import AnswerSchema, answer_schema
from processors.batching import PhaseObserver, run_isolated, timed
from processors.decision import decide, unknown_recommendation
from processors.errors import ErrorCode, Failure, ProcessingError, failure_from_exception
from processors.inference import InferenceEngine, PreparedRequest
from processors.prompt import build_prompt, parse_questions, prompt_hash
from processors.records import (
    PickupRequest,
    SourcePosition,
    VerificationAttempt,
    VerificationDecision,
)

if TYPE_CHECKING:
    from processors.gathering import GatheredImages
    from processors.tiling import TiledRequest, TilingConfig

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2
VALID = "valid"
INVALID = "invalid"

Tiler = Callable[["GatheredImages", "TilingConfig"], "TiledRequest"]


class ImageSource(Protocol):
    """Fetches the images of a batch (implemented by `processors.gathering.ImageGatherer`)."""

    async def gather_batch(
        self, requests: Sequence[PickupRequest]
    ) -> list[GatheredImages | Failure]:
        """One result per request, same order; a failing request yields a `Failure`."""
        ...


@runtime_checkable
class SubmittingEngine(Protocol):
    """An engine that takes one request at a time (`processors.slot_engine.SlotEngine`).

    `submit` returns a future of an object with the answer's `text`; with `timeout=0` it
    raises `queue.Full` at once while the engine's queue is full. `has_room` says whether
    a submission would be taken now (the agent stops fetching while it is False).
    """

    @property
    def model_version(self) -> str:
        """The version the decisions of this engine name."""

    def submit(self, request: PreparedRequest, *, timeout: float | None = None) -> Future[Any]:
        """Queue `request`; `queue.Full` when the queue stays full for `timeout` s."""

    def has_room(self) -> bool:
        """Whether a submission would be taken now."""


SUBMIT_RETRY_S = 0.01  # how often a submission refused by a full queue is tried again


async def submit_when_room(engine: SubmittingEngine, request: PreparedRequest) -> Future[Any]:
    """Submit without blocking the event loop: while the queue is full, wait and try again."""
    while True:
        try:
            return engine.submit(request, timeout=0)
        except queue.Full:
            await asyncio.sleep(SUBMIT_RETRY_S)


@dataclass(frozen=True, slots=True)
class VerificationInput:
    """One request to verify and where it was read from (None outside Kafka)."""

    request: PickupRequest
    source: SourcePosition | None = None


@dataclass(frozen=True, slots=True)
class VerificationOutcome:
    """The result for one input: exactly one of `decision` and `failure` is set.

    `attempts` holds one record per model attempt that produced text; `raw_outputs` the
    texts themselves, first attempt first. `images`: the decoded images the model
    received (None in replay mode), for the review copies (processors/review/images.py).
    """

    input: VerificationInput
    decision: VerificationDecision | None
    failure: Failure | None
    attempts: tuple[VerificationAttempt, ...] = ()
    raw_outputs: tuple[str, ...] = ()
    images: GatheredImages | None = None

    def __post_init__(self) -> None:
        if (self.decision is None) == (self.failure is None):
            raise ValueError("exactly one of decision and failure must be set")


@dataclass(slots=True)
class _Item:
    """Working state of one input while its batch runs."""

    input: VerificationInput
    key: str
    questions: list[dict[str, Any]] = field(default_factory=list)
    failure: Failure | None = None
    pixel_values: Any = None
    num_patches: tuple[int, ...] = ()
    vendor_count: int = 0
    pickup_count: int = 0
    gather_ms: float = 0.0
    model_s: float = 0.0
    answer: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    error_codes: list[ErrorCode] = field(default_factory=list)
    attempts: list[VerificationAttempt] = field(default_factory=list)
    raw_outputs: list[str] = field(default_factory=list)
    gathered: GatheredImages | None = None
    schema: AnswerSchema | None = None

    @property
    def request(self) -> PickupRequest:
        return self.input.request


@dataclass(frozen=True, slots=True)
class _CallResult:
    """One request's share of an engine call: its text or failure, and the call's size/time."""

    output: str | Failure
    call_ms: float
    call_size: int
    share_s: float


def _utc_now() -> datetime:
    return datetime.now(UTC)


class VerificationPipeline:
    """Runs micro-batches of pickup requests through prompt, model and decision.

    `images=None` is replay mode: no image is fetched or tiled and `pixel_values` stays None.
    With an `ImageSource`, `tiling` is required; `tile` defaults to
    `processors.tiling.tile_images` (imported on first use, so replay never loads torch).
    `clock` gives decision and attempt timestamps (timezone-aware); `timer` measures
    durations in seconds. `on_phase(phase, seconds)` is told, once per `run`, the wall
    time of each phase the batch went through: "gather" and "tile" (not in replay mode),
    "model" (every engine call of the batch, both attempts) and "decide".
    """

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        images: ImageSource | None,
        tiling: TilingConfig | None,
        clock: Callable[[], datetime] = _utc_now,
        timer: Callable[[], float] = time.perf_counter,
        tile: Tiler | None = None,
        on_phase: PhaseObserver | None = None,
    ) -> None:
        """Keep the collaborators; nothing is loaded. `ValueError` for images without tiling."""
        if images is not None and tiling is None:
            raise ValueError("an ImageSource needs a TilingConfig")
        self._engine = engine
        self._images = images
        self._tiling = tiling
        self._clock = clock
        self._timer = timer
        self._tile = tile
        self._on_phase = on_phase

    async def run(
        self, inputs: Sequence[VerificationInput], *, batch_id: str
    ) -> list[VerificationOutcome]:
        """Verify a batch; one outcome per input, in input order.

        Never raises for a per-request problem (those become failures); an `ImageSource`
        that raises for the whole batch fails every request of it with that cause.
        """
        started = self._timer()
        items = [_Item(inp, inp.request.idempotency_key) for inp in inputs]
        for item in items:
            try:
                item.questions = parse_questions(item.request.question)
            except ProcessingError as exc:
                item.failure = exc.to_failure("prompt")

        await self._prepare_images([i for i in items if i.failure is None])

        pending = [i for i in items if i.failure is None]
        model_s: float | None = None  # None: the engine was never called
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if not pending:
                break
            call_s = await self._infer(pending, attempt, batch_id)
            if call_s is not None:
                model_s = (model_s or 0.0) + call_s
            pending = [i for i in pending if i.failure is None and i.answer is None]
        if model_s is not None and self._on_phase is not None:
            self._on_phase("model", model_s)
        for item in pending:
            # The last attempt names the cause: not well-formed, or an unknown recommendation.
            code = item.error_codes[-1] if item.error_codes else ErrorCode.MODEL_OUTPUT_INVALID
            item.failure = Failure(
                code,
                "; ".join(f"attempt {n}: {e}" for n, e in enumerate(item.errors, 1))[:2000],
                "decide" if code is ErrorCode.UNKNOWN_RECOMMENDATION else "parse",
            )

        with timed(self._on_phase, "decide", self._timer):
            return [self._outcome(item, started) for item in items]

    # ------------------------------------------------------------------------------ images

    async def _prepare_images(self, items: list[_Item]) -> None:
        if self._images is None:
            for item in items:
                item.vendor_count = len(item.request.pickupproductimage)
                item.pickup_count = len(item.request.skupickdone)
                item.num_patches = (1,) * (item.vendor_count + item.pickup_count)
            return
        if not items:
            return
        try:
            with timed(self._on_phase, "gather", self._timer):
                gathered = await self._images.gather_batch([i.request for i in items])
            if len(gathered) != len(items):
                raise RuntimeError(f"image source returned {len(gathered)} for {len(items)}")
        except Exception as exc:
            # Whole-batch failure of the image source: every request fails with its cause.
            log.debug("image source failed for a batch of %d", len(items), exc_info=True)
            failure = failure_from_exception(exc, "gather")
            for item in items:
                item.failure = failure
            return
        # Each call writes its tiles (or its failure) into its item.
        tiling = [
            self._tile_one(item, result)
            for item, result in zip(items, gathered, strict=True)
            if not isinstance(result, Failure)
        ]
        if tiling:
            with timed(self._on_phase, "tile", self._timer):
                await asyncio.gather(*tiling)
        for item, result in zip(items, gathered, strict=True):
            if isinstance(result, Failure):
                item.failure = result

    async def _tile_one(self, item: _Item, gathered: GatheredImages) -> None:
        tile = self._tile
        if tile is None:
            # Imported here: tiling pulls in torch, which replay mode never needs.
            from processors.tiling import tile_images

            tile = self._tile = tile_images
        config = self._tiling
        assert config is not None  # __init__ refuses an ImageSource without a TilingConfig
        started = self._timer()
        try:
            result = await asyncio.to_thread(tile, gathered, config)
        except Exception as exc:
            log.debug("tiling %s failed", item.request.uuid, exc_info=True)
            item.failure = failure_from_exception(exc, "tile")
            return
        item.pixel_values = result.pixel_values
        item.gathered = gathered
        item.num_patches = tuple(result.num_patches)
        item.vendor_count = result.vendor_count
        item.pickup_count = result.pickup_count
        item.gather_ms = gathered.gather_ms + (self._timer() - started) * 1000.0

    # ------------------------------------------------------------------------------ model

    async def _infer(self, items: list[_Item], attempt: int, batch_id: str) -> float | None:
        """One engine call for `items` at `attempt`; records outputs, answers and failures.

        Returns the wall time of the call in seconds (None when no item had a prompt).
        """
        ready: list[tuple[_Item, PreparedRequest]] = []
        for item in items:
            try:
                prompt = build_prompt(
                    item.request.productname,
                    item.questions,
                    item.vendor_count,
                    item.pickup_count,
                    strict=attempt > 1,
                )
            except ProcessingError as exc:
                item.failure = exc.to_failure("prompt")
                continue
            if item.schema is None:
                item.schema = answer_schema(item.questions)
            prepared = PreparedRequest(
                request_id=item.request.uuid,
                attempt=attempt,
                prompt=prompt,
                num_patches=item.num_patches,
                pixel_values=item.pixel_values,
                answer_schema=item.schema,
            )
            ready.append((item, prepared))
        if not ready:
            return None
        started = self._timer()
        results = await self._call_engine([prepared for _, prepared in ready])
        elapsed_s = self._timer() - started
        for (item, prepared), result in zip(ready, results, strict=True):
            item.model_s += result.share_s
            if isinstance(result.output, Failure):
                item.failure = result.output
                continue
            parsed = parse_answer(result.output)
            item.raw_outputs.append(result.output)
            error = parsed.error
            if parsed.answer is not None:
                # Well-formed, but the recommendation must be one the rules know.
                error = unknown_recommendation(parsed.answer) or ""
                if not error:
                    item.answer = parsed.answer
                else:
                    item.error_codes.append(ErrorCode.UNKNOWN_RECOMMENDATION)
            else:
                item.error_codes.append(ErrorCode.MODEL_OUTPUT_INVALID)
            if item.answer is None:
                item.errors.append(error)
            item.attempts.append(
                VerificationAttempt(
                    request_uuid=item.request.uuid,
                    shippingid=item.request.shippingid,
                    attempt=attempt,
                    prompt_hash=prompt_hash(prepared.prompt),
                    raw_output=result.output,
                    validation_status=VALID if parsed.ok and not error else INVALID,
                    validation_error=error,
                    model_version=self._engine.model_version,
                    batch_id=batch_id,
                    batch_size=result.call_size,
                    gather_ms=item.gather_ms,
                    model_ms=result.call_ms,
                    idempotency_key=item.key,
                    occurred_at_ms=int(self._clock().timestamp() * 1000),
                )
            )
        return elapsed_s

    async def _call_engine(self, batch: list[PreparedRequest]) -> list[_CallResult]:
        """Generate for the whole batch; if that raises, once per request (`run_isolated`).

        The time of a failed batch call is shared among its requests too, so
        `processing_time_ai` counts every second the GPU spent on a request.
        """
        if isinstance(self._engine, SubmittingEngine):
            return list(await asyncio.gather(*(self._submit(p) for p in batch)))
        failed_s: list[float] = []  # wall time of each call that raised, latest last
        batch_failed_s = 0.0

        async def generate(part: Sequence[PreparedRequest]) -> list[_CallResult]:
            started = self._timer()
            try:
                texts = await asyncio.to_thread(self._engine.generate, list(part))
                if len(texts) != len(part):
                    raise RuntimeError(f"engine returned {len(texts)} texts for {len(part)}")
            except Exception:
                failed_s.append(self._timer() - started)
                raise
            elapsed_s = self._timer() - started
            share = elapsed_s / len(part)
            return [_CallResult(str(text), elapsed_s * 1000.0, len(part), share) for text in texts]

        def failed(_: PreparedRequest, exc: Exception) -> _CallResult:
            own_s = failed_s[-1]
            return _CallResult(_model_failure(exc), own_s * 1000.0, 1, own_s)

        def batch_failed(_: Exception) -> None:
            nonlocal batch_failed_s
            batch_failed_s = failed_s[-1]

        results = await run_isolated(generate, batch, failed, on_batch_error=batch_failed)
        if not batch_failed_s:
            return results
        extra_s = batch_failed_s / len(batch)
        return [_CallResult(r.output, r.call_ms, r.call_size, r.share_s + extra_s) for r in results]

    async def _submit(self, prepared: PreparedRequest) -> _CallResult:
        """One submission to a `SubmittingEngine`; its time runs from submit to answer."""
        engine = self._engine
        assert isinstance(engine, SubmittingEngine)
        started = self._timer()
        output: str | Failure
        try:
            completion = await asyncio.wrap_future(await submit_when_room(engine, prepared))
            output = str(completion.text)
        except Exception as exc:
            log.debug("submission of %s failed", prepared.request_id, exc_info=True)
            output = _model_failure(exc)
        elapsed_s = self._timer() - started
        return _CallResult(output, elapsed_s * 1000.0, 1, elapsed_s)

    # ------------------------------------------------------------------------------ decide

    def _outcome(self, item: _Item, started: float) -> VerificationOutcome:
        decision: VerificationDecision | None = None
        if item.failure is None and item.answer is not None:
            try:
                decision = decide(
                    item.request,
                    item.questions,
                    item.answer,
                    model_version=self._engine.model_version,
                    processing_time_ai=item.model_s,
                    total_time=self._timer() - started,
                    source=item.input.source,
                    now=self._clock(),
                )
            except Exception as exc:
                log.debug("deciding %s failed", item.request.uuid, exc_info=True)
                item.failure = failure_from_exception(exc, "decide")
        if decision is None and item.failure is None:
            item.failure = Failure(ErrorCode.INTERNAL, "no answer and no failure", "decide")
        return VerificationOutcome(
            input=item.input,
            decision=decision,
            failure=item.failure if decision is None else None,
            attempts=tuple(item.attempts),
            raw_outputs=tuple(item.raw_outputs),
            images=item.gathered,
        )


def _model_failure(exc: BaseException) -> Failure:
    if isinstance(exc, ProcessingError):
        return exc.to_failure("model")
    return Failure(ErrorCode.MODEL_FAILED, f"{type(exc).__name__}: {exc}"[:2000], "model")
