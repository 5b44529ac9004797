"""Micro-batch handlers: decode, run the processors, publish, then acknowledge.

A handler receives the raw messages of one micro-batch and returns once every output
of the batch is handed to the producer; the agent then waits for the broker's
acknowledgements and only after that acknowledges the inputs (at-least-once).
Per-event failures become dead letters and never block the rest of the batch. If
publishing fails, the exception propagates and no input is acknowledged, so the
batch is redelivered: duplicates are possible, and every output carries the input's
idempotency key to collapse them.

Both roles share one shape, `MicroBatchHandler`: decode and validate every message
(a bad one is a dead letter), run the role's processor on the decoded batch through
`processors.batching.run_isolated` (if the processor raises, each input runs alone, so
one bad input cannot sink the batch), publish each result in input order, then run the
role's after-batch step. A role supplies only its schema, parser, processor and
publisher: `VerificationHandler` and `CategorizationHandler`.

Each event's outcome is logged as one structured line and counted in the metrics;
phase times are observed by the processors themselves, once per batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from processors.batching import run_isolated
from processors.errors import Failure, failure_from_exception
from processors.records import (
    CategoryTag,
    DeadLetter,
    PickupRequest,
    ProductListing,
    SourcePosition,
)
from processors.review.images import ReviewCopier
from processors.verification import VerificationInput, VerificationOutcome, VerificationPipeline
from streams.codecs import Codecs, now_ms, until_registry_answers
from streams.logs import log_outcome
from streams.metrics import Metrics
from streams.publishing import EventWriter
from streams.settings import Topics

In = TypeVar("In")
Out = TypeVar("Out")
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
        """Where the message was read: topic, partition, offset."""
        return SourcePosition(self.topic, self.partition, self.offset)


class BatchHandler(Protocol):
    """What an agent hands a micro-batch to (`MicroBatchHandler`, or a test double)."""

    async def handle(self, messages: Sequence[RawMessage], writer: EventWriter) -> None:
        """Hand every output of `messages` to `writer`; raise only if publishing fails."""


def dead_letter(message: RawMessage, failure: Failure, **context: Any) -> DeadLetter:
    """The dead letter of `message`: its bytes, position, the failure and `context`.

    `request_uuid` and `shippingid` in `context` get their own fields; every other entry
    is kept as text in `extra`.
    """
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


class MicroBatchHandler(ABC, Generic[In, Out]):
    """Decode, process in isolation, publish in input order: the shape of both roles.

    Subclasses set `agent` (the faust agent's name), `schema` (the input topic's
    schema) and `stage` (the failure stage when their processor raises), and implement
    `parse`, `process` and `publish`; `after_batch` is optional.
    """

    agent: ClassVar[str]
    schema: ClassVar[str]
    stage: ClassVar[str]

    def __init__(
        self, codecs: Codecs, topics: Topics, max_message_bytes: int, metrics: Metrics
    ) -> None:
        """`max_message_bytes`: the largest input accepted (a larger one is a dead letter)."""
        self._codec = codecs.for_schema(self.schema)
        self._topics = topics
        self._max_bytes = max_message_bytes
        self._metrics = metrics

    # ------------------------------------------------------------------ the role's parts

    @abstractmethod
    def parse(self, event: Mapping[str, Any]) -> In:
        """The input record of a decoded event; `ProcessingError` when it is invalid."""

    @abstractmethod
    async def process(self, batch: Sequence[tuple[RawMessage, In]]) -> Sequence[Out | Failure]:
        """One result or failure per input, in order; raising retries input by input."""

    @abstractmethod
    async def publish(
        self, writer: EventWriter, message: RawMessage, record: In, result: Out | Failure
    ) -> None:
        """Write the outputs of one input (a failure becomes a dead letter)."""

    async def after_batch(self, writer: EventWriter, results: Sequence[Out | Failure]) -> None:
        """Runs once every result of the batch is published; nothing by default."""

    # ------------------------------------------------------------------ the shared shape

    async def handle(self, messages: Sequence[RawMessage], writer: EventWriter) -> None:
        """Decode, process and publish one micro-batch; see the module docstring.

        Raises only what `writer` raises (publishing failed): then nothing is acknowledged.
        """
        decoded = await self._decode_all(writer, messages)
        if not decoded:
            return
        results = await run_isolated(
            self.process,
            decoded,
            self._failed,
            on_batch_error=functools.partial(self._batch_raised, len(decoded)),
        )
        for (message, record), result in zip(decoded, results, strict=True):
            await self.publish(writer, message, record, result)
        await self.after_batch(writer, results)

    def _failed(self, item: tuple[RawMessage, In], exc: Exception) -> Failure:
        return failure_from_exception(exc, self.stage)

    def _batch_raised(self, size: int, exc: Exception) -> None:
        log.error(
            "%s: a batch of %d raised; running its events one by one",
            self.agent,
            size,
            exc_info=exc,
        )

    async def _decode_all(
        self, writer: EventWriter, messages: Sequence[RawMessage]
    ) -> list[tuple[RawMessage, In]]:
        """Decode and validate each message; one that fails becomes a dead letter (stage decode).

        While the schema registry is unreachable for a new schema id this waits (no dead
        letter, nothing acknowledged) and goes on when it answers.
        """
        decoded: list[tuple[RawMessage, In]] = []
        for message in messages:
            decode = functools.partial(self._codec.decode, message.value, max_bytes=self._max_bytes)
            try:
                record = await until_registry_answers(
                    decode,
                    f"decoding {message.position}",
                    blocking=self._codec.needs_registry(message.value),
                )
                decoded.append((message, self.parse(record)))
            except Exception as exc:
                log.debug("%s is not a valid input", message.position, exc_info=True)
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
        """Write the dead letter of `message`, count it and log its outcome line."""
        record = dead_letter(
            message, failure, request_uuid=request_uuid, shippingid=shippingid, **context
        )
        await writer.write(self._topics.dead_letter, message.key, record.to_event(), origin=message)
        self._metrics.count_dead_letter(int(failure.code), failure.code.name, failure.stage)
        if 1200 <= int(failure.code) < 1300:
            self._metrics.count_image_error(failure.code)
        elif 1300 <= int(failure.code) < 1400:
            self._metrics.count_model_failure(failure.code)
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
        """Log the one structured outcome line of an input."""
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


class VerificationHandler(MicroBatchHandler[PickupRequest, VerificationOutcome]):
    """`pickup-completed` → `verification-decision` (+ attempts, + dead letters, + copies)."""

    agent = "verify-pickups"
    schema = "pickup-completed"
    stage = "verify"

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
        super().__init__(codecs, topics, max_message_bytes, metrics)
        self._pipeline = pipeline
        self._copier = copier

    def parse(self, event: Mapping[str, Any]) -> PickupRequest:
        """The pickup request of a `pickup-completed` event."""
        return PickupRequest.from_event(event)

    async def process(
        self, batch: Sequence[tuple[RawMessage, PickupRequest]]
    ) -> Sequence[VerificationOutcome | Failure]:
        """Run the verification pipeline on the batch (one batch id per call)."""
        inputs = [VerificationInput(request=r, source=m.position) for m, r in batch]
        return await self._pipeline.run(inputs, batch_id=uuid.uuid4().hex[:16])

    async def publish(
        self,
        writer: EventWriter,
        message: RawMessage,
        record: PickupRequest,
        result: VerificationOutcome | Failure,
    ) -> None:
        """The attempts, then the decision (or the dead letter with the raw outputs)."""
        if isinstance(result, Failure):
            await self.dead_letter(writer, message, result)
            return
        request = result.input.request
        timings = await self._publish_attempts(writer, message, result)
        if result.decision is not None:
            decision = result.decision
            await writer.write(
                self._topics.verification_decision,
                request.shippingid,
                decision.to_event(),
                origin=message,
            )
            timings["total"] = decision.total_time * 1000
            self.outcome(
                message, decision.ai_decision, request.uuid, request.shippingid, timings=timings
            )
            return
        failure = result.failure or failure_from_exception(RuntimeError("no decision"), "verify")
        raw_outputs = {
            f"raw_output_{number}": raw[:20_000]
            for number, raw in enumerate(result.raw_outputs, start=1)
        }
        await self.dead_letter(
            writer,
            message,
            failure,
            request_uuid=request.uuid,
            shippingid=request.shippingid,
            **raw_outputs,
        )

    async def _publish_attempts(
        self, writer: EventWriter, message: RawMessage, outcome: VerificationOutcome
    ) -> dict[str, float]:
        """Write every model attempt, count the retries; the timings of the outcome line."""
        timings: dict[str, float] = {}
        for attempt in outcome.attempts:
            await writer.write(
                self._topics.verification_attempts,
                outcome.input.request.uuid,
                attempt.to_event(),
                origin=message,
            )
            timings[f"model_attempt_{attempt.attempt}"] = attempt.model_ms
            if attempt.attempt == 1:
                timings["gather"] = attempt.gather_ms
            else:
                self._metrics.count_retry()
        return timings

    async def after_batch(
        self, writer: EventWriter, results: Sequence[VerificationOutcome | Failure]
    ) -> None:
        """The review copies, only after every decision of the batch is sent.

        The refund path never waits on copies.
        """
        for result in results:
            await self._publish_copies(result, writer)

    async def _publish_copies(
        self, outcome: VerificationOutcome | Failure, writer: EventWriter
    ) -> None:
        """The review copies of a verified request (decided or failed by the model), by hash.

        A failure to make them is logged (request uuid and error type only; the traceback
        at debug level, redacted like every line) and skipped: a missing copy must not hold
        back the batch. Raises only what `writer` raises.
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
            log.debug("review copies of %s failed", request.uuid, exc_info=True)
            return
        for copy in copies:
            await writer.write(self._topics.review_image, copy.sha256, copy.to_event())


class Categorize(Protocol):
    """Categorizes a batch (`processors.categorization.CategorizationService`)."""

    async def __call__(
        self,
        listings: Sequence[ProductListing],
        keys: Sequence[str],
        sources: Sequence[SourcePosition],
    ) -> Sequence[CategoryTag | Failure]:
        """One tag or failure per listing, in order."""


class CategorizationHandler(MicroBatchHandler[ProductListing, CategoryTag]):
    """`product-listed` → `category-tag` (+ dead letters)."""

    agent = "categorize-listings"
    schema = "product-listed"
    stage = "categorize"

    def __init__(
        self,
        categorize: Categorize,
        codecs: Codecs,
        topics: Topics,
        max_message_bytes: int,
        metrics: Metrics,
    ) -> None:
        """`categorize`: fetches the listings' images, then predicts the batch."""
        super().__init__(codecs, topics, max_message_bytes, metrics)
        self._categorize = categorize

    def parse(self, event: Mapping[str, Any]) -> ProductListing:
        """The listing of a `product-listed` event."""
        return ProductListing.from_event(event)

    async def process(
        self, batch: Sequence[tuple[RawMessage, ProductListing]]
    ) -> Sequence[CategoryTag | Failure]:
        """Categorize the batch, keyed by each listing's idempotency key."""
        listings = [listing for _, listing in batch]
        keys = [listing.idempotency_key for listing in listings]
        return await self._categorize(listings, keys, [message.position for message, _ in batch])

    async def publish(
        self,
        writer: EventWriter,
        message: RawMessage,
        record: ProductListing,
        result: CategoryTag | Failure,
    ) -> None:
        """The category tag, keyed by product id (or the dead letter)."""
        if isinstance(result, Failure):
            await self.dead_letter(writer, message, result)
            return
        await writer.write(
            self._topics.category_tag, record.product_id, result.to_event(), origin=message
        )
        self.outcome(message, "categorized", None, None)
