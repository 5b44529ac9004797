"""The review page's reads, over data the real handler produced and the real sink stored."""

from __future__ import annotations

from datetime import date
from typing import Any

from processors.analytics.rows import SinkRecord
from processors.analytics.sink import AnalyticsSink
from processors.review.store import QueueFilter, ReviewStore, apply_retention, enforce_budget
from streams.codecs import Codecs
from streams.settings import Topics
from tests.processors.review.conftest import T0, image_event, jpeg, new_sink, rec, verdict
from tests.support.review_data import decided, evidence_answer, review_pickup


async def load(sink: AnalyticsSink) -> None:
    pickups = [
        review_pickup(1, productname="Blue <b>shirt</b>"),
        review_pickup(2, productid="P-TWO"),
        review_pickup(3, previousuuid="req-00001"),
        review_pickup(4, productname="Broken answer bag"),
    ]
    outputs = {
        "req-00001": evidence_answer("Blue.", "Accept"),
        "req-00002": evidence_answer("Torn sleeve.", "Reject", colour="No"),
        "req-00003": evidence_answer("Retake: blurry.", "Retry", colour="No"),
        "req-00004": "not json <b>at all</b>",
    }
    codecs, topics = Codecs(), Topics()
    for offset, (topic, _key, value) in enumerate(await decided(pickups, outputs)):
        event = codecs.for_schema(topics.schema_of(topic)).decode(value)
        sink.add(SinkRecord(topic, 0, offset, event, T0 + offset))
    sink.flush()


async def test_queue_filters_and_pages(ch: Any, dsn: str, sinks: list[AnalyticsSink]) -> None:
    await load(new_sink(sinks, dsn))
    store = ReviewStore(ch)
    everything = store.queue(QueueFilter())
    assert {r["uuid"] for r in everything.rows} == {"req-00001", "req-00002", "req-00003"}
    times = [r["event_time"] for r in everything.rows]
    assert times == sorted(times, reverse=True)  # newest first
    assert not everything.has_next
    picks = store.queue(QueueFilter(decision="Pick"))
    assert [r["uuid"] for r in picks.rows] == ["req-00001"]
    assert [r["uuid"] for r in store.queue(QueueFilter(product="P-TWO")).rows] == ["req-00002"]
    assert [r["uuid"] for r in store.queue(QueueFilter(product="<b>SHIRT")).rows] == ["req-00001"]
    assert [r["uuid"] for r in store.queue(QueueFilter(recommendation="Retry")).rows] == [
        "req-00003"
    ]
    assert store.queue(QueueFilter(below=0.0)).rows == []
    assert len(store.queue(QueueFilter(below=101.0)).rows) == 3
    assert store.queue(QueueFilter(end=date(2000, 1, 1))).rows == []
    assert store.queue(QueueFilter(page=2)).rows == []


async def test_decision_detail_has_answers_copies_and_the_retake_chain(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    await load(new_sink(sinks, dsn))
    store = ReviewStore(ch)
    key = next(r for r in store.queue(QueueFilter()).rows if r["uuid"] == "req-00001")[
        "idempotency_key"
    ]
    detail = store.decision(key)
    assert detail is not None
    assert detail.productname == "Blue <b>shirt</b>"
    assert [a["evidence"] for a in detail.answers][:1] == ["Blue."]
    assert detail.attempts and detail.attempts[0]["raw_output"].startswith("{")
    assert [i["image_index"] for i in detail.images["vendor"]] == [0]
    assert [i["image_index"] for i in detail.images["pickup"]] == [0, 1]
    assert [r["uuid"] for r in detail.later] == ["req-00003"]
    retake = store.decision(detail.later[0]["idempotency_key"])
    assert retake is not None and [r["uuid"] for r in retake.earlier] == ["req-00001"]
    copy = store.image(detail.images["pickup"][0]["sha256"])
    assert copy is not None and copy.startswith(b"\xff\xd8")
    assert store.image("0" * 64) is None and store.image("../etc/passwd") is None
    assert store.decision("no-such-key") is None


async def test_reviewed_filter_and_latest_review(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn)
    await load(sink)
    store = ReviewStore(ch)
    key = store.queue(QueueFilter()).rows[0]["idempotency_key"]
    sink.add(rec("verification-review", 0, verdict(key, ai="Not Pick", reviewer_decision="Pick")))
    sink.flush()
    assert [r["idempotency_key"] for r in store.queue(QueueFilter(reviewed=True)).rows] == [key]
    assert len(store.queue(QueueFilter(reviewed=False)).rows) == 2
    review = store.latest_review(key)
    assert review is not None and review["reviewer_decision"] == "Pick"


def test_the_size_budget_deletes_the_oldest_copies(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn)
    now = 1_900_000_000_000
    images = [jpeg((i * 40, 0, 0)) for i in range(3)]
    for offset, data in enumerate(images):
        sink.add(
            rec("review-image", offset, image_event(data, index=offset, created_at_ms=now + offset))
        )
    sink.flush()
    budget = len(images[1]) + len(images[2])
    ch.command("SYSTEM START MERGES")  # a mutation waits for merges
    assert enforce_budget(ch, budget) == len(images[0])
    store = ReviewStore(ch)
    kept = [store.image(image_event(d)["sha256"]) is not None for d in images]
    assert kept == [False, True, True]
    apply_retention(ch, 7)
    assert "toIntervalDay(7)" in ch.command("SHOW CREATE TABLE review_images")
    apply_retention(ch, 30)


async def test_the_failures_queue_lists_dead_letters_with_their_raw_outputs(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    await load(new_sink(sinks, dsn))
    store = ReviewStore(ch)
    (failure,) = store.queue(QueueFilter(failures=True)).rows
    assert failure["request_uuid"] == "req-00004" and failure["error_name"] == "MODEL_FAILED"
    assert [i["image_index"] for i in failure["images"]["pickup"]] == [0, 1]
    assert store.image(failure["images"]["vendor"][0]["sha256"]) is not None
    assert store.queue(QueueFilter(failures=True, product="Broken answer")).rows == [failure]
    assert store.queue(QueueFilter(failures=True, product="no such product")).rows == []
    assert len(store.queue(QueueFilter()).rows) == 3  # decisions only
