"""The agents' loop without a broker: metrics once per batch, acknowledgement after storing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from processors.inference import ReplayEngine
from processors.verification import VerificationPipeline
from streams.agents import (
    HandlerConsumer,
    SinkConsumer,
    StreamingConsumer,
    process_batch,
    run_agent,
    to_raw,
)
from streams.codecs import Codecs
from streams.handlers import RawMessage, VerificationHandler
from streams.metrics import PHASES, Metrics
from streams.publishing import EventWriter
from streams.settings import Topics
from tests.support.events import pickup_event, valid_answer
from tests.support.publishing import RecordingPublisher

CODECS = Codecs()
TOPICS = Topics()


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None = 1_763_800_000.25


@dataclass
class Event:
    message: Message
    acks: list[tuple[str, int]] = field(default_factory=list)

    def ack(self) -> bool:
        self.acks.append((self.message.topic, self.message.offset))
        return True


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(f"visionstream_{name}", labels)
    return 0.0 if found is None else found


def pickup_events(count: int) -> list[Event]:
    encode = CODECS.for_schema("pickup-completed").encode
    events = []
    for n in range(count):
        event = pickup_event(n)
        message = Message("pickup-completed", 0, n, event["shippingid"].encode(), encode(event))
        events.append(Event(message))
    return events


def verification_handler(metrics: Metrics, count: int) -> VerificationHandler:
    engine = ReplayEngine({f"req-{n:05d}": [valid_answer()] for n in range(count)})
    pipeline = VerificationPipeline(
        engine, images=None, tiling=None, on_phase=metrics.observe_phase
    )
    return VerificationHandler(pipeline, CODECS, TOPICS, 1 << 24, metrics)


async def test_a_batch_of_16_is_one_observation_of_its_size_and_of_each_phase() -> None:
    metrics, publisher = Metrics(), RecordingPublisher()
    events = pickup_events(16)
    await process_batch(
        verification_handler(metrics, 16),
        events,
        lambda: EventWriter(publisher, CODECS, TOPICS),
        metrics,
    )
    assert publisher.topics().count("verification-decision") == 16
    assert sample(metrics, "batch_size_count", agent="verify-pickups") == 1
    assert sample(metrics, "batch_size_sum", agent="verify-pickups") == 16
    counts = {phase: sample(metrics, "phase_seconds_count", phase=phase) for phase in PHASES}
    # Replay mode fetches and tiles nothing; the sink and categorizer are other roles.
    assert counts == {
        "gather": 0,
        "tile": 0,
        "model": 1,
        "decide": 1,
        "categorize": 0,
        "sink": 0,
        "publish": 1,
    }
    assert sample(metrics, "events_in_total", topic="pickup-completed") == 16
    assert sample(metrics, "events_out_total", topic="verification-decision") == 16
    assert [event.acks for event in events] == [[("pickup-completed", n)] for n in range(16)]


async def test_the_handler_consumer_runs_its_after_step_once_per_batch() -> None:
    metrics, publisher = Metrics(), RecordingPublisher()
    after: list[int] = []
    consumer = HandlerConsumer(
        verification_handler(metrics, 4),
        lambda: EventWriter(publisher, CODECS, TOPICS),
        metrics,
        size=8,
        within=0.5,
        after=lambda: after.append(len(publisher.sent)),
    )
    events = pickup_events(4)
    await consumer.consume(events)
    assert after == [len(publisher.sent)] and publisher.topics().count("verification-decision") == 4
    assert all(event.acks for event in events)


class RecordingStore:
    def __init__(self, *, fail: bool = False) -> None:
        self.stored: list[list[RawMessage]] = []
        self.fail = fail

    async def store(self, messages: Sequence[RawMessage]) -> None:
        if self.fail:
            raise RuntimeError("database gone")
        self.stored.append(list(messages))


async def test_the_sink_consumer_acknowledges_only_after_storing() -> None:
    metrics = Metrics()
    events = [Event(Message("category-tag", 1, n, b"k", b"v")) for n in range(3)]
    store = RecordingStore()
    await SinkConsumer(store, metrics, size=500, within=1.0).consume(events)
    assert [[m.offset for m in batch] for batch in store.stored] == [[0, 1, 2]]
    assert store.stored[0][0].timestamp_ms == 1_763_800_000_250
    assert all(event.acks for event in events)
    assert sample(metrics, "batch_size_count", agent="analytics-sink") == 1
    assert sample(metrics, "events_in_total", topic="category-tag") == 3

    failing = [Event(Message("category-tag", 1, 3, b"k", b"v"))]
    with pytest.raises(RuntimeError, match="database gone"):
        await SinkConsumer(RecordingStore(fail=True), metrics, 500, 1.0).consume(failing)
    assert failing[0].acks == []


class RecordingDispatcher:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    async def dispatch(self, events: Sequence[Any], messages: Sequence[RawMessage]) -> None:
        self.calls.append((len(events), [m.offset for m in messages]))


async def test_the_streaming_consumer_hands_each_input_to_the_verifier() -> None:
    dispatcher = RecordingDispatcher()
    events = [Event(Message("pickup-completed", 0, n, None, b"v")) for n in (4, 5)]
    await StreamingConsumer(dispatcher, size=16).consume(events)
    assert dispatcher.calls == [(2, [4, 5])]
    assert all(event.acks == [] for event in events)  # the verifier acknowledges, later


class FakeStream:
    def __init__(self, batches: list[list[Event]]) -> None:
        self.batches = batches
        self.taken: list[tuple[int, float]] = []

    async def noack_take(self, size: int, within: float) -> AsyncIterator[list[Event]]:
        self.taken.append((size, within))
        for batch in self.batches:
            yield batch


async def test_an_agent_waits_for_its_consumer_then_feeds_it_every_batch() -> None:
    ready = asyncio.Event()
    seen: list[list[int]] = []

    @dataclass(frozen=True)
    class Consumer:
        size: int = 7
        within: float = 0.25

        async def consume(self, events: Sequence[Any]) -> None:
            seen.append([e.message.offset for e in events])

    async def consumer() -> Consumer:
        await ready.wait()
        return Consumer()

    stream = FakeStream([[Event(Message("t", 0, 0, None, None))], []])
    agent = asyncio.create_task(run_agent(stream, consumer))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert stream.taken == [] and not agent.done()
    ready.set()
    await asyncio.wait_for(agent, 1)
    assert stream.taken == [(7, 0.25)] and seen == [[0], []]


def test_a_message_without_a_timestamp_keeps_none() -> None:
    [raw] = to_raw([Event(Message("t", 2, 9, b"k", b"v", timestamp=0.0))])
    assert (raw.position.partition, raw.position.offset, raw.timestamp_ms) == (2, 9, None)
