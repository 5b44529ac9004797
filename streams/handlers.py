"""Micro-batch handlers: decode, run the processors, publish, then acknowledge.

A handler receives the raw messages of one micro-batch and returns once every output
of the batch is handed to the producer; the agent then waits for the broker's
acknowledgements and only after that acknowledges the inputs (at-least-once).
Per-event failures become dead letters and never block the rest of the batch. If
publishing fails, the exception propagates and no input is acknowledged, so the
batch is redelivered: duplicates are possible, and every output carries the input's
idempotency key to collapse them.

Each event's outcome is logged as one structured line and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from processors.errors import Failure, failure_from_exception
from processors.records import (
    DeadLetter,
    PickupRequest,
    ProductListing,
    SourcePosition,
)
from processors.review.images import ReviewCopier
from processors.verification import VerificationInput, VerificationOutcome, VerificationPipeline
from streams.codecs import Codecs, TopicCodec, now_ms, until_registry_answers
from streams.logs import log_outcome
from streams.metrics import Metrics
from streams.publishing import EventWriter
from streams.settings import Topics

T = TypeVar("T")
log = logging.getLogger(__name__)
outcomes_log = logging.getLogger("visionstream.outcomes")


@dataclass(frozen=True, slots=True)
class RawMessage:
    """The parts of a Kafka message a handler needs (faust's Message adapts to this)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    # The Kafka message timestamp (ms, UTC); None when the broker gave none.
    timestamp_ms: int | None = None

    @property
    def position(self) -> SourcePosition:
        return SourcePosition(self.topic, self.partition, self.offset)


class BatchHandler(Protocol):
    async def handle(self, messages: Sequence[RawMessage], writer: EventWriter) -> None: ...


def dead_letter(message: RawMessage, failure: Failure, **context: Any) -> DeadLetter:
    extra = {k: str(v) for k, v in context.items() if k not in {"request_uuid", "shippingid"}}
    return DeadLetter(
        original_value=message.value or b"",
        original_key=message.key,
        source=message.position,
        error_code=int(failure.code),
        error_name=failure.code.name,
        error_message=failure.message,
        stage=failure.stage,
        failed_at_ms=now_ms(),
        request_uuid=context.get("request_uuid"),
        shippingid=context.get("shippingid"),
        extra=extra,
    )


class _Outputs:
    """Shared by both handlers: decoding inputs, dead letters with their metrics, outcome lines."""

    def __init__(self, topics: Topics, metrics: Metrics) -> None:
        self.topics = topics
        self.metrics = metrics

    async def decode_all(
        self,
        writer: EventWriter,
        messages: Sequence[RawMessage],
        codec: TopicCodec,
        max_bytes: int,
        parse: Callable[[dict[str, Any]], T],
    ) -> list[tuple[RawMessage, T]]:
        """Decode and validate each message; one that fails becomes a dead letter (stage decode).

        While the schema registry is unreachable for a new schema id this waits (no dead
        letter, nothing acknowledged) and goes on when it answers.
        """
        decoded: list[tuple[RawMessage, T]] = []
        for message in messages:
            decode = functools.partial(codec.decode, message.value, max_bytes=max_bytes)
            try:
                record = await until_registry_answers(
                    decode,
                    f"decoding {message.position}",
                    blocking=codec.needs_registry(message.value),
                )
                decoded.append((message, parse(record)))
            except Exception as exc:
                await self.dead_letter(writer, message, failure_from_exception(exc, "decode"))
        return decoded

    async def dead_letter(
        self,
        writer: EventWriter,
        message: RawMessage,
        failure: Failure,
        *,
        request_uuid: str | None = None,
        shippingid: str | None = None,
        **context: Any,
    ) -> None:
        record = dead_letter(
            message, failure, request_uuid=request_uuid, shippingid=shippingid, **context
        )
        await writer.write(self.topics.dead_letter, message.key, record.to_event(), origin=message)
        self.metrics.count_dead_letter(int(failure.code), failure.code.name, failure.stage)
        if 1200 <= int(failure.code) < 1300:
            self.metrics.count_image_error(failure.code)
        elif 1300 <= int(failure.code) < 1400:
            self.metrics.count_model_failure(failure.code)
        self.outcome(message, "dead_letter", request_uuid, shippingid, code=int(failure.code))

    def outcome(
        self,
        message: RawMessage,
        outcome: str,
        request_uuid: str | None,
        shippingid: str | None,
        *,
        code: int | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        log_outcome(
            outcomes_log,
            request_uuid=request_uuid,
            shippingid=shippingid,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            outcome=outcome,
            code=code,
            timings=timings,
        )


class VerificationHandler:
    """`pickup-completed` → `verification-decision` (+ attempts, + dead letters)."""

    agent = "verify-pickups"

    def __init__(
        self,
        pipeline: VerificationPipeline,
        codecs: Codecs,
        topics: Topics,
        max_message_bytes: int,
        metrics: Metrics,
        copier: ReviewCopier | None = None,
    ) -> None:
        """`copier`: makes the review copies of each decided request (None: no copies)."""
        self._pipeline = pipeline
        self._copier = copier
        self._codec = codecs.for_schema("pickup-completed")
        self._topics = topics
        self._max_bytes = max_message_bytes
        self._metrics = metrics
        self._out = _Outputs(topics, metrics)

    async def handle(self, messages: Sequence[RawMessage], writer: EventWriter) -> None:
        decoded = await self._out.decode_all(
            writer, messages, self._codec, self._max_bytes, PickupRequest.from_event
        )
        if not decoded:
            return
        by_input = [message for message, _ in decoded]
        inputs = [VerificationInput(request=r, source=m.position) for m, r in decoded]
        batch_id = uuid.uuid4().hex[:16]
        outcomes = await self._run_isolated(inputs, batch_id)
        for message, outcome in zip(by_input, outcomes, strict=True):
            await self._publish(message, outcome, writer)
        # Only after every decision of the batch is sent: the refund path never waits on copies.
        for outcome in outcomes:
            await self._publish_copies(outcome, writer)

    async def _publish_copies(
        self, outcome: VerificationOutcome | Failure, writer: EventWriter
    ) -> None:
        """The review copies of a verified request (decided or failed by the model), by hash; never raises.

        A failure to make them is logged (request uuid and error type only) and skipped:
        a missing copy must not hold back the batch.
        """
        if self._copier is None or isinstance(outcome, Failure):
            return
        request = outcome.input.request
        # A model failure is reviewed too (failures queue): its copies carry the input's key.
        key = outcome.decision.idempotency_key if outcome.decision else request.idempotency_key
        try:
            copies = await asyncio.to_thread(
                self._copier.copies,
                request,
                outcome.images,
                key,
                now_ms(),
            )
        except Exception as exc:
            log.warning("no review copies for request %s: %s", request.uuid, type(exc).__name__)
            return
        for copy in copies:
            await writer.write(self._topics.review_image, copy.sha256, copy.to_event())

    async def _run_isolated(
        self, inputs: list[VerificationInput], batch_id: str
    ) -> list[VerificationOutcome | Failure]:
        """Run the batch; if the pipeline itself raises, retry item by item to isolate it."""
        try:
            return list(await self._pipeline.run(inputs, batch_id=batch_id))
        except Exception:
            log.exception(
                "verification batch %s raised; retrying its %d events one by one",
                batch_id,
                len(inputs),
            )
        results: list[VerificationOutcome | Failure] = []
        for item in inputs:
            try:
                results.extend(
                    await self._pipeline.run([item], batch_id=f"{batch_id}-{len(results)}")
                )
            except Exception as exc:
                results.append(failure_from_exception(exc, "verify"))
        return results

    async def _publish(
        self, message: RawMessage, outcome: VerificationOutcome | Failure, writer: EventWriter
    ) -> None:
        if isinstance(outcome, Failure):
            await self._out.dead_letter(writer, message, outcome)
            return
        request = outcome.input.request
        timings: dict[str, float] = {}
        for attempt in outcome.attempts:
            await writer.write(
                self._topics.verification_attempts,
                request.uuid,
                attempt.to_event(),
                origin=message,
            )
            self._metrics.observe_phase("model", attempt.model_ms / 1000)
            timings[f"model_attempt_{attempt.attempt}"] = attempt.model_ms
            if attempt.attempt == 1:
                self._metrics.observe_phase("gather", attempt.gather_ms / 1000)
                timings["gather"] = attempt.gather_ms
            else:
                self._metrics.count_retry()
        if outcome.decision is not None:
            decision = outcome.decision
            await writer.write(
                self._topics.verification_decision,
                request.shippingid,
                decision.to_event(),
                origin=message,
            )
            timings["total"] = decision.total_time * 1000
            self._out.outcome(
                message, decision.ai_decision, request.uuid, request.shippingid, timings=timings
            )
            return
        failure = outcome.failure or failure_from_exception(RuntimeError("no decision"), "verify")
        raw_outputs = {
            f"raw_output_{number}": raw[:20_000]
            for number, raw in enumerate(outcome.raw_outputs, start=1)
        }
        await self._out.dead_letter(
            writer,
            message,
            failure,
            request_uuid=request.uuid,
            shippingid=request.shippingid,
            **raw_outputs,
        )


class CategorizationHandler:
    """`product-listed` → `category-tag` (+ dead letters)."""

    agent = "categorize-listings"

    def __init__(
        self,
        categorize: Any,
        codecs: Codecs,
        topics: Topics,
        max_message_bytes: int,
        metrics: Metrics,
    ) -> None:
        # `categorize` is the runtime's CategorizationService: fetch images, then predict.
        self._categorize = categorize
        self._codec = codecs.for_schema("product-listed")
        self._topics = topics
        self._max_bytes = max_message_bytes
        self._metrics = metrics
        self._out = _Outputs(topics, metrics)

    async def handle(self, messages: Sequence[RawMessage], writer: EventWriter) -> None:
        decoded = await self._out.decode_all(
            writer, messages, self._codec, self._max_bytes, ProductListing.from_event
        )
        if not decoded:
            return
        kept = [message for message, _ in decoded]
        listings = [listing for _, listing in decoded]
        keys = [listing.idempotency_key for listing in listings]
        sources = [message.position for message in kept]
        started = time.perf_counter()
        try:
            results = await self._categorize(listings, keys, sources)
        except Exception as exc:
            log.exception("categorization batch of %d raised", len(listings))
            results = [failure_from_exception(exc, "categorize")] * len(listings)
        self._metrics.observe_phase("categorize", time.perf_counter() - started)
        for message, listing, result in zip(kept, listings, results, strict=True):
            if isinstance(result, Failure):
                await self._out.dead_letter(writer, message, result)
            else:
                await writer.write(
                    self._topics.category_tag, listing.product_id, result.to_event(), origin=message
                )
                self._out.outcome(message, "categorized", None, None)
