"""The agents' loop, apart from faust's registration: take a micro-batch, consume it, ack.

Every agent of both roles is `run_agent`: wait until its runtime built a `BatchConsumer`,
then take micro-batches bounded by size and time without auto-acks (`micro_batches`:
faust's `noack_take`; its `take()` acknowledges a batch even when the agent raises) and
hand each to the consumer, which acknowledges the inputs only after every output is
stored. Three consumers exist:

- `HandlerConsumer`: a `BatchHandler` through `process_batch` (static micro-batches);
- `StreamingConsumer`: each input on its own through `streams.streaming.StreamingVerifier`
  (the slot engine, `VS_ENGINE_MODE=slot`);
- `SinkConsumer`: the analytics sink's `SinkRuntime.store`.

Nothing here needs a broker: tests drive the consumers with plain objects that have a
`message` and an `ack()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import faust
from faust.streams import Stream

from streams.handlers import BatchHandler, RawMessage
from streams.metrics import Metrics
from streams.publishing import EventWriter

log = logging.getLogger(__name__)

BATCH_RETRY_MAX_S = 30.0
# Slot mode: how long the agent waits for more arrivals before handing on what it has.
SLOT_TAKE_WAIT_S = 0.02


class KafkaMessage(Protocol):
    """The fields of faust's `Message` an agent reads."""

    @property
    def topic(self) -> str:
        """The topic it was read from."""

    @property
    def partition(self) -> int:
        """Its partition."""

    @property
    def offset(self) -> int:
        """Its offset."""

    @property
    def key(self) -> bytes | None:
        """The raw key."""

    @property
    def value(self) -> bytes | None:
        """The raw value."""

    @property
    def timestamp(self) -> float | None:
        """The Kafka timestamp in seconds (faust's convention); <= 0 or None when absent."""


class TakenEvent(Protocol):
    """An event taken without auto-ack: its message, and its acknowledgement."""

    @property
    def message(self) -> KafkaMessage:
        """The Kafka message of the event."""

    def ack(self) -> object:
        """Acknowledge the event (faust commits past it once earlier ones are acked)."""


class BatchConsumer(Protocol):
    """What an agent hands its micro-batches to, and how it takes them."""

    @property
    def size(self) -> int:
        """The most events of one micro-batch."""

    @property
    def within(self) -> float:
        """The longest wait, in seconds, for a micro-batch to fill."""

    async def consume(self, events: Sequence[TakenEvent]) -> None:
        """Process `events` and acknowledge each once its outputs are stored."""


def micro_batches(
    stream: faust.StreamT[Any], size: int, within: float
) -> AsyncIterator[Sequence[Any]]:
    """Batches of up to `size` events, at most `within` seconds apart, never auto-acked.

    faust's `StreamT` interface does not declare `noack_take`; its `Stream` class has it.
    """
    return cast(Stream[Any], stream).noack_take(size, within=within)


async def run_agent(
    stream: faust.StreamT[Any], consumer: Callable[[], Awaitable[BatchConsumer]]
) -> None:
    """The body of every agent: wait for the consumer, then feed it micro-batches."""
    ready = await consumer()
    async for events in micro_batches(stream, ready.size, ready.within):
        await ready.consume(events)


def to_raw(events: Sequence[TakenEvent]) -> list[RawMessage]:
    """The `RawMessage` of each event, in order."""
    return [
        RawMessage(
            topic=event.message.topic,
            partition=event.message.partition,
            offset=event.message.offset,
            key=event.message.key,
            value=event.message.value,
            timestamp_ms=kafka_timestamp_ms(event.message.timestamp),
        )
        for event in events
    ]


def kafka_timestamp_ms(seconds: float | None) -> int | None:
    """The Kafka timestamp in ms of faust's (seconds, float); None when absent (<= 0)."""
    if seconds is None or seconds <= 0:
        return None
    return round(seconds * 1000)


def count_batch(metrics: Metrics, agent: str, messages: Sequence[RawMessage]) -> None:
    """One observation of the batch's size, and one input counted per message."""
    metrics.observe_batch(agent, len(messages))
    for message in messages:
        metrics.count_in(message.topic)


async def process_batch(
    handler: BatchHandler,
    events: Sequence[TakenEvent],
    new_writer: Callable[[], EventWriter],
    metrics: Metrics,
    *,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Handle one micro-batch; acknowledge its inputs only after every output is stored.

    Per-event failures are dead letters and publishing failures are retried or replaced
    inside the writer. If the handler still raises, the whole batch runs again with a
    new writer after a capped backoff, and nothing is acknowledged meanwhile: the agent
    never crashes, because faust restarts a crashed agent past its unacknowledged batch.
    Outputs sent by a failed run may repeat, with the same idempotency keys. The batch
    size and the publish phase are observed once per batch (also when it ran again).
    """
    messages = to_raw(events)
    agent = getattr(handler, "agent", type(handler).__name__)
    count_batch(metrics, agent, messages)
    delay = 0.5
    while True:
        writer = new_writer()
        try:
            await handler.handle(messages, writer)
            with metrics.time_phase("publish"):
                await writer.flush()
            break
        except Exception:
            log.exception(
                "%s: a batch of %d raised; running it again in %.1fs, nothing acknowledged",
                agent,
                len(messages),
                delay,
            )
            await sleep(delay)
            delay = min(delay * 2, BATCH_RETRY_MAX_S)
    for topic, sent in writer.sent.items():
        metrics.count_out(topic, sent)
    for event in events:
        event.ack()


@dataclass(frozen=True, slots=True)
class HandlerConsumer:
    """Static micro-batches through `handler` (`process_batch`); `after` runs after each."""

    handler: BatchHandler
    new_writer: Callable[[], EventWriter]
    metrics: Metrics
    size: int
    within: float
    after: Callable[[], None] | None = None

    async def consume(self, events: Sequence[TakenEvent]) -> None:
        """`process_batch`, then `after()` (engine metrics); raises only what `after` raises."""
        await process_batch(self.handler, events, self.new_writer, self.metrics)
        if self.after is not None:
            self.after()


class Dispatcher(Protocol):
    """Starts each input on its own (`streams.streaming.StreamingVerifier`)."""

    async def dispatch(self, events: Sequence[TakenEvent], messages: Sequence[RawMessage]) -> None:
        """Start every input; return once there is room for more."""


@dataclass(frozen=True, slots=True)
class StreamingConsumer:
    """Slot mode: what arrived goes to the verifier at once, one task per input."""

    verifier: Dispatcher
    size: int
    within: float = SLOT_TAKE_WAIT_S

    async def consume(self, events: Sequence[TakenEvent]) -> None:
        """Hand the inputs on; the verifier acknowledges each in offset order when done."""
        await self.verifier.dispatch(events, to_raw(events))


class Store(Protocol):
    """Stores a batch (`streams.runtime.SinkRuntime`)."""

    async def store(self, messages: Sequence[RawMessage]) -> None:
        """Return once every message is stored (or skipped as undecodable)."""


@dataclass(frozen=True, slots=True)
class SinkConsumer:
    """The analytics sink: store the batch, then acknowledge it."""

    sink: Store
    metrics: Metrics
    size: int
    within: float
    agent: str = "analytics-sink"

    async def consume(self, events: Sequence[TakenEvent]) -> None:
        """Count, store (retrying inside while ClickHouse is away), then acknowledge."""
        messages = to_raw(events)
        count_batch(self.metrics, self.agent, messages)
        await self.sink.store(messages)
        for event in events:
            event.ack()
