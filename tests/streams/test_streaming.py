"""StreamingVerifier on a submitting engine whose answers finish out of order.

Each input is published as soon as its own answer is done, but acknowledged only in
offset order per partition, after its outputs and those of every earlier input of its
partition were acknowledged; a retry is a new submission; dispatch holds the agent
while the engine's queue is full.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from processors.verification import VerificationPipeline
from streams.codecs import Codecs
from streams.handlers import RawMessage, VerificationHandler
from streams.metrics import Metrics
from streams.publishing import EventWriter
from streams.settings import Topics
from streams.streaming import StreamingVerifier
from tests.support.events import pickup_event, valid_answer
from tests.support.publishing import RecordingPublisher
from tests.support.streaming_engine import OutOfOrderEngine, reversed_delays

CODECS, TOPICS = Codecs(), Topics()
DECODE_DECISION = CODECS.for_schema("verification-decision").decode


@dataclass
class World:
    """The publisher, the engine and what was acknowledged (offset, partition) when."""

    publisher: RecordingPublisher
    engine: OutOfOrderEngine
    acked: list[tuple[int, int]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def decided(self) -> list[tuple[int, int]]:
        """(partition, offset) of every decision sent, in the order sent."""
        out = []
        for topic, _, value in self.publisher.sent:
            if topic == TOPICS.verification_decision:
                source = DECODE_DECISION(value)["source"]
                out.append((source["partition"], source["offset"]))
        return out


@dataclass
class FakeEvent:
    """A faust event's `ack`: checks that the input and all before it were decided."""

    world: World
    partition: int
    offset: int

    def ack(self) -> None:
        decided = set(self.world.decided())
        earlier = [(self.partition, o) for o in range(self.offset + 1)]
        missing = [position for position in earlier if position not in decided]
        if missing:
            self.world.violations.append(f"ack of {self.offset} before outputs of {missing}")
        self.world.acked.append((self.partition, self.offset))


def build(
    engine: OutOfOrderEngine, *, max_in_flight: int = 64, handler: Any = None
) -> tuple[StreamingVerifier, World]:
    publisher = RecordingPublisher()
    world = World(publisher, engine)
    handler = handler or VerificationHandler(
        VerificationPipeline(engine, images=None, tiling=None),
        CODECS,
        TOPICS,
        16 * 1024 * 1024,
        Metrics(),
    )
    verifier = StreamingVerifier(
        handler,
        lambda: EventWriter(publisher, CODECS, TOPICS),
        Metrics(),
        has_room=engine.has_room,
        max_in_flight=max_in_flight,
    )
    return verifier, world


def inputs(world: World, numbers: Sequence[int], partition: int = 0) -> tuple[list[Any], list[Any]]:
    encode = CODECS.for_schema("pickup-completed").encode
    events, messages = [], []
    for n in numbers:
        event = pickup_event(n)
        messages.append(
            RawMessage(
                "pickup-completed", partition, n, event["shippingid"].encode(), encode(event)
            )
        )
        events.append(FakeEvent(world, partition, n))
    return events, messages


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def outputs() -> dict[str, list[str]]:
    return {f"req-{n:05d}": [valid_answer()] for n in range(16)}


async def test_decisions_go_out_as_answers_finish_and_acks_follow_offset_order(
    outputs: dict[str, list[str]],
) -> None:
    engine = OutOfOrderEngine(outputs, reversed_delays(0.02, 0.03, 8), slots=8, queue_size=16)
    engine.load()
    verifier, world = build(engine)
    try:
        await verifier.dispatch(*inputs(world, range(8)))
        await wait_until(lambda: len(world.acked) == 8)
    finally:
        engine.close()
    # The engine answered the last first, and each decision went out when its answer was done.
    assert [request for request, _ in engine.completed] == [
        f"req-{n:05d}" for n in range(7, -1, -1)
    ]
    assert world.decided() == [(0, n) for n in range(7, -1, -1)]
    # ... but nothing was acknowledged until offset 0 was done, then all in offset order.
    assert world.acked == [(0, n) for n in range(8)]
    assert not world.violations


async def test_partitions_acknowledge_independently(outputs: dict[str, list[str]]) -> None:
    slow = {0: 0.6}
    engine = OutOfOrderEngine(
        outputs, lambda r: slow.get(int(r.request_id[-5:]), 0.01), slots=8, queue_size=16
    )
    engine.load()
    verifier, world = build(engine)
    try:
        events0, messages0 = inputs(world, [0, 1], partition=0)
        events1, messages1 = inputs(world, [2, 3], partition=1)
        await verifier.dispatch([*events0, *events1], [*messages0, *messages1])
        await wait_until(lambda: (1, 3) in world.acked)
        assert (0, 1) not in world.acked  # behind the slow offset 0
        await wait_until(lambda: len(world.acked) == 4)
    finally:
        engine.close()
    assert world.acked[:2] == [(1, 2), (1, 3)] and world.acked[2:] == [(0, 0), (0, 1)]


async def test_an_invalid_answer_is_submitted_again_as_a_new_request() -> None:
    outputs = {
        "req-00000": ["no json here at all", valid_answer()],
        "req-00001": [valid_answer()],
    }
    engine = OutOfOrderEngine(outputs, lambda r: 0.01, slots=4, queue_size=4)
    engine.load()
    verifier, world = build(engine)
    try:
        await verifier.dispatch(*inputs(world, [0, 1]))
        await wait_until(lambda: len(world.acked) == 2)
    finally:
        engine.close()
    assert sorted(engine.submitted) == [("req-00000", 1), ("req-00000", 2), ("req-00001", 1)]
    attempts = [t for t, _, _ in world.publisher.sent if t == TOPICS.verification_attempts]
    assert len(attempts) == 3
    assert world.acked == [(0, 0), (0, 1)] and not world.violations


async def test_dispatch_holds_the_agent_while_the_engine_queue_is_full(
    outputs: dict[str, list[str]],
) -> None:
    engine = OutOfOrderEngine(outputs, lambda r: 0.3, slots=1, queue_size=1)
    engine.load()
    verifier, world = build(engine)
    try:
        await verifier.dispatch(*inputs(world, range(2)))
        # One request decodes, one waits in the queue: the queue is full.
        await wait_until(lambda: len(engine.submitted) == 2 and not engine.has_room())
        started = time.monotonic()
        await verifier.dispatch(*inputs(world, [2]))
        held_s = time.monotonic() - started
        # The agent took nothing more until the first answer made room.
        assert held_s >= 0.2, held_s
        assert engine.completed
        await wait_until(lambda: len(world.acked) == 3)
    finally:
        engine.close()
    assert world.acked == [(0, n) for n in range(3)]


async def test_dispatch_holds_the_agent_at_the_in_flight_limit(
    outputs: dict[str, list[str]],
) -> None:
    engine = OutOfOrderEngine(outputs, lambda r: 0.2, slots=8, queue_size=16)
    engine.load()
    verifier, world = build(engine, max_in_flight=2)
    try:
        await verifier.dispatch(*inputs(world, range(3)))
        assert verifier.in_flight < 2 and world.acked
        await wait_until(lambda: len(world.acked) == 3)
    finally:
        engine.close()


class FlakyHandler:
    """Raises the first time it sees offset 1, then delegates."""

    def __init__(self, inner: VerificationHandler) -> None:
        self.inner = inner
        self.raised = 0

    async def handle(self, messages: Sequence[RawMessage], writer: EventWriter) -> None:
        if messages[0].offset == 1 and not self.raised:
            self.raised += 1
            raise RuntimeError("transient trouble")
        await self.inner.handle(messages, writer)


async def test_an_input_whose_handling_raises_runs_again_and_holds_later_acks(
    outputs: dict[str, list[str]],
) -> None:
    engine = OutOfOrderEngine(outputs, lambda r: 0.01, slots=4, queue_size=4)
    engine.load()
    pipeline = VerificationPipeline(engine, images=None, tiling=None)
    flaky = FlakyHandler(VerificationHandler(pipeline, CODECS, TOPICS, 1 << 24, Metrics()))
    verifier, world = build(engine, handler=flaky)
    try:
        await verifier.dispatch(*inputs(world, range(3)))
        await wait_until(lambda: (0, 0) in world.acked)
        await asyncio.sleep(0.2)
        assert world.acked == [(0, 0)]  # 2 is done, but 1 waits for its retry (0.5 s)
        await wait_until(lambda: len(world.acked) == 3)
    finally:
        engine.close()
    assert flaky.raised == 1 and world.acked == [(0, 0), (0, 1), (0, 2)]
    assert not world.violations


async def test_drain_cancels_what_is_late_and_acknowledges_none_of_it(
    outputs: dict[str, list[str]],
) -> None:
    engine = OutOfOrderEngine(outputs, lambda r: 5.0 if r.request_id == "req-00000" else 0.01)
    engine.load()
    verifier, world = build(engine)
    try:
        await verifier.dispatch(*inputs(world, range(3)))
        await wait_until(lambda: len(world.decided()) == 2)
        await verifier.drain(0.1)
        await verifier.dispatch(*inputs(world, [3]))  # after drain: not started
    finally:
        engine.close()
    assert world.acked == [] and verifier.in_flight == 0
    assert (0, 3) not in world.decided()
