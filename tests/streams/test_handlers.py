"""VerificationHandler with review copies: decisions go out first, copies after, by content hash."""

from __future__ import annotations

import hashlib
from typing import Any

from processors.gathering import GatherLimits
from processors.inference import ReplayEngine
from processors.review.images import CopyLimits, ReviewCopier
from processors.verification import VerificationPipeline
from streams.codecs import Codecs
from streams.handlers import RawMessage, VerificationHandler
from streams.metrics import Metrics
from streams.publishing import EventWriter
from streams.settings import Topics
from tests.support.events import pickup_event, tiny_png_b64, valid_answer
from tests.support.publishing import RecordingPublisher


class BrokenCopier(ReviewCopier):
    def copies(self, *args: Any, **kwargs: Any) -> Any:
        raise MemoryError("no room for copies")


async def run_batch(
    copier: ReviewCopier | None, events: list[dict[str, Any]]
) -> RecordingPublisher:
    codecs, topics = Codecs(), Topics()
    engine = ReplayEngine({e["uuid"]: [valid_answer()] for e in events})
    handler = VerificationHandler(
        VerificationPipeline(engine, images=None, tiling=None),
        codecs,
        topics,
        16 * 1024 * 1024,
        Metrics(),
        copier=copier,
    )
    encode = codecs.for_schema("pickup-completed").encode
    messages = [
        RawMessage("pickup-completed", 0, n, e["shippingid"].encode(), encode(e))
        for n, e in enumerate(events)
    ]
    publisher = RecordingPublisher()
    writer = EventWriter(publisher, codecs, topics)
    await handler.handle(messages, writer)
    await writer.flush()
    return publisher


def events() -> list[dict[str, Any]]:
    first = {**pickup_event(1), "pickupproductimage": [tiny_png_b64((0, 0, 200))]}
    second = {**pickup_event(2), "skupickdone": [tiny_png_b64((9, 9, 9)), tiny_png_b64()]}
    return [first, second]


async def test_copies_follow_every_decision_of_the_batch_keyed_by_their_hash() -> None:
    publisher = await run_batch(ReviewCopier(CopyLimits(), GatherLimits()), events())
    sent = publisher.topics()
    decisions = [i for i, t in enumerate(sent) if t == "verification-decision"]
    copies = [i for i, t in enumerate(sent) if t == "review-image"]
    assert len(decisions) == 2
    # vendor + pickup of the first request; two pickups of the second (its vendor is a URL).
    assert len(copies) == 4
    assert max(decisions) < min(copies)
    decode = Codecs().for_schema("review-image").decode
    seen = []
    for index in copies:
        _, key, value = publisher.sent[index]
        copy = decode(value)
        assert key == copy["sha256"].encode() == hashlib.sha256(copy["jpeg"]).hexdigest().encode()
        seen.append((copy["request_uuid"], copy["role"], copy["image_index"]))
    assert seen == [
        ("req-00001", "vendor", 0),
        ("req-00001", "pickup", 0),
        ("req-00002", "pickup", 0),
        ("req-00002", "pickup", 1),
    ]


async def test_a_model_failure_gets_copies_too_keyed_by_its_input() -> None:
    codecs, topics = Codecs(), Topics()
    event = {**pickup_event(3), "pickupproductimage": [tiny_png_b64((0, 0, 200))]}
    handler = VerificationHandler(
        VerificationPipeline(ReplayEngine({}), images=None, tiling=None),  # no recording: fails
        codecs,
        topics,
        16 * 1024 * 1024,
        Metrics(),
        copier=ReviewCopier(CopyLimits(), GatherLimits()),
    )
    message = RawMessage(
        "pickup-completed", 0, 0, b"k", codecs.for_schema("pickup-completed").encode(event)
    )
    publisher = RecordingPublisher()
    writer = EventWriter(publisher, codecs, topics)
    await handler.handle([message], writer)
    assert publisher.topics() == ["dead-letter", "review-image", "review-image"]
    copy = codecs.for_schema("review-image").decode(publisher.sent[1][2])
    assert copy["request_uuid"] == "req-00003" and copy["decision_key"]


async def test_a_failing_copier_never_holds_back_the_decisions() -> None:
    publisher = await run_batch(BrokenCopier(CopyLimits(), GatherLimits()), events())
    assert publisher.topics().count("verification-decision") == 2
    assert "review-image" not in publisher.topics()


async def test_no_copier_no_copies() -> None:
    publisher = await run_batch(None, events())
    assert "review-image" not in publisher.topics()
