"""Micro-batch handlers: decode, run the processors, publish, then acknowledge.

A handler receives the raw messages of one micro-batch and returns only after every
output of the batch was acknowledged by the broker; the agent acknowledges the
inputs after that (at-least-once). Per-event failures become dead letters and never
block the rest of the batch. If publishing fails, the exception propagates and no
input is acknowledged, so the whole batch is redelivered: duplicates are possible,
and every output carries the input's idempotency key to collapse them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from processors.errors import Failure, failure_from_exception
from processors.records import (
    DeadLetter,
    PickupRequest,
    ProductListing,
    SourcePosition,
    idempotency_key,
)
from processors.verification import VerificationInput, VerificationOutcome, VerificationPipeline
from streams.codecs import Codecs, now_ms
from streams.publishing import EventWriter
from streams.settings import Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """The parts of a Kafka message a handler needs (faust's Message adapts to this)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

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


class VerificationHandler:
    """`pickup-completed` → `verification-decision` (+ attempts, + dead letters)."""

    def __init__(
        self, pipeline: VerificationPipeline, codecs: Codecs, topics: Topics, max_message_bytes: int
    ) -> None:
        self._pipeline = pipeline
        self._codec = codecs.for_schema("pickup-completed")
        self._topics = topics
        self._max_bytes = max_message_bytes

    async def handle(self, messages: Sequence[RawMessage], writer: EventWriter) -> None:
        inputs: list[VerificationInput] = []
        by_input: list[RawMessage] = []
        for message in messages:
            try:
                event = self._codec.decode(message.value, max_bytes=self._max_bytes)
                request = PickupRequest.from_event(event)
            except Exception as exc:
                failure = failure_from_exception(exc, "decode")
                await writer.write(
                    self._topics.dead_letter, message.key, dead_letter(message, failure).to_event()
                )
                continue
            inputs.append(VerificationInput(request=request, source=message.position))
            by_input.append(message)
        if not inputs:
            return
        batch_id = uuid.uuid4().hex[:16]
        outcomes = await self._run_isolated(inputs, batch_id)
        for message, outcome in zip(by_input, outcomes, strict=True):
            await self._publish(message, outcome, writer)

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
            await writer.write(
                self._topics.dead_letter, message.key, dead_letter(message, outcome).to_event()
            )
            return
        request = outcome.input.request
        for attempt in outcome.attempts:
            await writer.write(self._topics.verification_attempts, request.uuid, attempt.to_event())
        if outcome.decision is not None:
            await writer.write(
                self._topics.verification_decision, request.shippingid, outcome.decision.to_event()
            )
            return
        failure = outcome.failure or failure_from_exception(RuntimeError("no decision"), "verify")
        context: dict[str, Any] = {"request_uuid": request.uuid, "shippingid": request.shippingid}
        for number, raw in enumerate(outcome.raw_outputs, start=1):
            context[f"raw_output_{number}"] = raw[:20_000]
        await writer.write(
            self._topics.dead_letter,
            message.key,
            dead_letter(message, failure, **context).to_event(),
        )


class CategorizationHandler:
    """`product-listed` → `category-tag` (+ dead letters)."""

    def __init__(
        self, categorize: Any, codecs: Codecs, topics: Topics, max_message_bytes: int
    ) -> None:
        # `categorize` is processors.categorization's batch service (see streams.runtime).
        self._categorize = categorize
        self._codec = codecs.for_schema("product-listed")
        self._topics = topics
        self._max_bytes = max_message_bytes

    async def handle(self, messages: Sequence[RawMessage], writer: EventWriter) -> None:
        listings: list[ProductListing] = []
        kept: list[RawMessage] = []
        for message in messages:
            try:
                event = self._codec.decode(message.value, max_bytes=self._max_bytes)
                listings.append(ProductListing.from_event(event))
                kept.append(message)
            except Exception as exc:
                failure = failure_from_exception(exc, "decode")
                await writer.write(
                    self._topics.dead_letter, message.key, dead_letter(message, failure).to_event()
                )
        if not listings:
            return
        keys = [
            idempotency_key(self._topics.product_listed, listing.event_id) for listing in listings
        ]
        sources = [message.position for message in kept]
        try:
            results = await self._categorize(listings, keys, sources)
        except Exception as exc:
            log.exception("categorization batch of %d raised", len(listings))
            results = [failure_from_exception(exc, "categorize")] * len(listings)
        for message, listing, result in zip(kept, listings, results, strict=True):
            if isinstance(result, Failure):
                await writer.write(
                    self._topics.dead_letter, message.key, dead_letter(message, result).to_event()
                )
            else:
                await writer.write(self._topics.category_tag, listing.product_id, result.to_event())
