"""The micro-batch handlers without a broker: review copies, isolation, dead letters.

VerificationHandler with review copies: decisions go out first, copies after, by content
hash. Both handlers: a processor that raises for a batch costs only the input that raises
alone; an undecodable input is a dead letter and the rest goes on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from processors.errors import Failure
from processors.gathering import GatherLimits
from processors.inference import ReplayEngine
from processors.records import CategoryTag, ProductListing, SourcePosition, TopCategory
from processors.review.images import CopyLimits, ReviewCopier
from processors.verification import VerificationInput, VerificationOutcome, VerificationPipeline
from streams.codecs import Codecs
from streams.handlers import CategorizationHandler, RawMessage, VerificationHandler
from streams.metrics import Metrics
from streams.publishing import EventWriter
from streams.settings import Topics
from tests.support.events import pickup_event, product_event, tiny_png_b64, valid_answer
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


# ------------------------------------------------------------------ the shared handler shape


class RaisingPipeline(VerificationPipeline):
    """The real pipeline, except that any batch holding `poisoned` raises (a bug's shape)."""

    def __init__(self, engine: ReplayEngine, poisoned: str) -> None:
        super().__init__(engine, images=None, tiling=None)
        self.poisoned = poisoned
        self.batches: list[list[str]] = []

    async def run(
        self, inputs: Sequence[VerificationInput], *, batch_id: str
    ) -> list[VerificationOutcome]:
        uuids = [item.request.uuid for item in inputs]
        self.batches.append(uuids)
        if self.poisoned in uuids:
            raise RuntimeError("pipeline bug")
        return await super().run(inputs, batch_id=batch_id)


def decode_sent(publisher: RecordingPublisher, topic: str) -> list[dict[str, Any]]:
    decode = Codecs().for_schema(topic).decode
    return [decode(value) for sent_topic, _, value in publisher.sent if sent_topic == topic]


async def test_a_pipeline_raising_for_the_batch_costs_only_the_input_that_raises_alone() -> None:
    codecs, topics = Codecs(), Topics()
    batch = [pickup_event(n) for n in (1, 2, 3)]
    engine = ReplayEngine({e["uuid"]: [valid_answer()] for e in batch})
    pipeline = RaisingPipeline(engine, poisoned="req-00002")
    handler = VerificationHandler(pipeline, codecs, topics, 1 << 24, Metrics())
    encode = codecs.for_schema("pickup-completed").encode
    messages = [RawMessage("pickup-completed", 0, n, b"k", encode(e)) for n, e in enumerate(batch)]
    publisher = RecordingPublisher()
    await handler.handle(messages, EventWriter(publisher, codecs, topics))
    assert pipeline.batches == [
        ["req-00001", "req-00002", "req-00003"],
        ["req-00001"],
        ["req-00002"],
        ["req-00003"],
    ]
    decided = [d["uuid"] for d in decode_sent(publisher, "verification-decision")]
    assert decided == ["req-00001", "req-00003"]
    [letter] = decode_sent(publisher, "dead-letter")
    assert (letter["stage"], letter["source_offset"]) == ("verify", 1)
    assert "pipeline bug" in letter["error_message"]


def tag(listing: ProductListing, key: str) -> CategoryTag:
    return CategoryTag(
        product_id=listing.product_id,
        category="tops",
        score=0.9,
        top_categories=(TopCategory("tops", 0.9),),
        tags=("cotton",),
        model_version="test",
        idempotency_key=key,
    )


class FakeCategorize:
    """Tags every listing; a batch holding `poisoned` raises."""

    def __init__(self, poisoned: str | None = None) -> None:
        self.poisoned = poisoned
        self.batches: list[list[str]] = []

    async def __call__(
        self,
        listings: Sequence[ProductListing],
        keys: Sequence[str],
        sources: Sequence[SourcePosition],
    ) -> list[CategoryTag | Failure]:
        ids = [listing.product_id for listing in listings]
        self.batches.append(ids)
        if self.poisoned in ids:
            raise MemoryError("encoder out of memory")
        assert [s.offset for s in sources] == [int(i[-5:]) for i in ids]
        return [tag(listing, key) for listing, key in zip(listings, keys, strict=True)]


async def categorize(
    categorize: FakeCategorize, values: list[bytes]
) -> tuple[RecordingPublisher, Metrics]:
    codecs, topics, metrics = Codecs(), Topics(), Metrics()
    handler = CategorizationHandler(categorize, codecs, topics, 1 << 24, metrics)
    messages = [RawMessage("product-listed", 0, n, b"k", v) for n, v in enumerate(values)]
    publisher = RecordingPublisher()
    await handler.handle(messages, EventWriter(publisher, codecs, topics))
    return publisher, metrics


def listing_values(*numbers: int) -> list[bytes]:
    encode = Codecs().for_schema("product-listed").encode
    return [encode(product_event(n)) for n in numbers]


async def test_categorization_publishes_each_tag_keyed_by_its_product() -> None:
    fake = FakeCategorize()
    publisher, _ = await categorize(fake, listing_values(0, 1, 2))
    assert fake.batches == [["PROD-00000", "PROD-00001", "PROD-00002"]]
    keys = [key for topic, key, _ in publisher.sent if topic == "category-tag"]
    assert keys == [b"PROD-00000", b"PROD-00001", b"PROD-00002"]
    assert [t["category"] for t in decode_sent(publisher, "category-tag")] == ["tops"] * 3


async def test_a_categorizer_raising_for_the_batch_costs_only_the_listing_that_raises_alone() -> (
    None
):
    fake = FakeCategorize(poisoned="PROD-00001")
    publisher, metrics = await categorize(fake, listing_values(0, 1, 2))
    assert fake.batches[1:] == [["PROD-00000"], ["PROD-00001"], ["PROD-00002"]]
    assert publisher.topics() == ["category-tag", "dead-letter", "category-tag"]
    [letter] = decode_sent(publisher, "dead-letter")
    assert (letter["stage"], letter["source_offset"]) == ("categorize", 1)
    assert "MemoryError" in letter["error_message"]
    dead = metrics.registry.get_sample_value(
        "visionstream_dead_letters_total",
        {"code": str(letter["error_code"]), "name": letter["error_name"], "stage": "categorize"},
    )
    assert dead == 1


async def test_an_undecodable_input_is_a_dead_letter_and_the_rest_goes_on() -> None:
    fake = FakeCategorize()
    values = listing_values(0, 2)
    publisher, _ = await categorize(fake, [values[0], b"\x00not an event", values[1]])
    assert fake.batches == [["PROD-00000", "PROD-00002"]]
    assert publisher.topics() == ["dead-letter", "category-tag", "category-tag"]
    [letter] = decode_sent(publisher, "dead-letter")
    assert (letter["stage"], letter["source_offset"]) == ("decode", 1)
