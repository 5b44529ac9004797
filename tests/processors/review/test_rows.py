"""The review tables filled by the analytics sink, on embedded chDB: exactly once, latest wins."""

from __future__ import annotations

import dataclasses
from typing import Any

from processors.analytics.rows import SinkRecord, rows_for
from processors.analytics.sink import AnalyticsSink
from processors.errors import Failure
from tests.processors.review.conftest import (
    T0,
    image_event,
    jpeg,
    new_sink,
    rec,
    verdict,
)

LATEST_REVIEW = (
    "SELECT * FROM (SELECT decision_key, review_id, toString(reviewer_decision), agrees, "
    "answers_marked, answers_wrong, reviewer FROM reviews ORDER BY reviewed_ms DESC, version DESC "
    "LIMIT 1 BY decision_key) ORDER BY decision_key"
)


def test_a_verdict_becomes_a_review_row_and_one_row_per_marked_answer(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn)
    assert (
        sink.add(rec("verification-review", 0, verdict("k1", reviewer_decision="Not Pick"))) is None
    )
    result = sink.flush()
    assert result.rows == {"reviews": 1, "review_answers": 2}
    assert ch.query(LATEST_REVIEW).result_rows == [
        ("k1", "a1" * 16, "Not Pick", False, 2, 1, "alice")
    ]
    answers = ch.query(
        "SELECT question_index, label, correct, reviewer FROM review_answers ORDER BY question_index"
    ).result_rows
    assert answers == [(0, "Color", True, "alice"), (1, "Brand", False, "alice")]


def test_a_later_verdict_supersedes_and_a_resent_one_counts_once(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn)
    first = verdict("k1", review_id="b2" * 16, reviewer_decision="Not Pick", at_ms=T0)
    later = verdict("k1", review_id="c3" * 16, reviewer_decision="Pick", at_ms=T0 + 60_000)
    # The later verdict arrives first, and the earlier one is redelivered at a new offset.
    for offset, event in enumerate((later, first, first)):
        sink.add(rec("verification-review", offset, event))
    sink.flush()
    assert ch.query(LATEST_REVIEW).result_rows == [("k1", "c3" * 16, "Pick", True, 2, 1, "alice")]
    ch.command("SYSTEM START MERGES")
    ch.command("OPTIMIZE TABLE reviews FINAL")
    assert ch.query("SELECT review_id FROM reviews").result_rows == [("c3" * 16,)]


def test_a_re_read_batch_flushed_by_a_new_sink_leaves_one_copy(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    records = [
        rec("verification-review", 0, verdict("k1")),
        rec("review-image", 0, image_event(jpeg())),
    ]
    for _ in range(2):  # a crash before the commit: a new process reads and writes again
        sink = new_sink(sinks, dsn)
        for record in records:
            sink.add(record)
        sink.flush()
        sink.close()
    for table, rows in (
        ("reviews", 1),
        ("review_answers", 2),
        ("review_images", 1),
        ("review_image_refs", 1),
    ):
        assert ch.query(f"SELECT count() FROM {table}").result_rows[0][0] == rows, table


def test_an_image_shared_by_two_requests_is_stored_by_content_once(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn)
    data = jpeg()
    sink.add(rec("review-image", 0, image_event(data, request_uuid="u-1", role="vendor")))
    sink.add(rec("review-image", 1, image_event(data, request_uuid="u-2", role="vendor")))
    sink.flush()
    refs = ch.query(
        "SELECT request_uuid, role, image_index, sha256 FROM review_image_refs ORDER BY request_uuid"
    ).result_rows
    assert [r[:3] for r in refs] == [("u-1", "vendor", 0), ("u-2", "vendor", 0)]
    assert refs[0][3] == refs[1][3]
    ch.command("SYSTEM START MERGES")
    ch.command("OPTIMIZE TABLE review_images FINAL")
    stored = ch.query("SELECT sha256, hex(jpeg), size_bytes FROM review_images").result_rows
    assert len(stored) == 1
    assert stored[0][1] == data.hex().upper() and stored[0][2] == len(data)


def test_bad_review_events_are_failures_not_rows() -> None:
    good_image = image_event(jpeg())
    bad = [
        ("verification-review", {**verdict("k1"), "reviewer_decision": "Maybe"}),
        ("verification-review", {**verdict("k1"), "reviewer": ""}),
        ("verification-review", {**verdict("k1"), "decision_key": ""}),
        ("review-image", {**good_image, "sha256": "0" * 64}),
        ("review-image", {**good_image, "role": "other"}),
        (
            "review-image",
            {**good_image, "jpeg": b"GIF89a", "sha256": image_event(b"GIF89a")["sha256"]},
        ),
    ]
    for topic, value in bad:
        assert isinstance(rows_for(SinkRecord(topic, 0, 0, value, T0)), Failure), value
    record = rec("verification-review", 0, verdict("k1"))
    assert not isinstance(rows_for(dataclasses.replace(record)), Failure)


def test_copies_older_than_the_retention_expire(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn)
    sink.add(rec("review-image", 0, image_event(jpeg((1, 2, 3)), created_at_ms=T0)))
    sink.add(rec("review-image", 1, image_event(jpeg((9, 9, 9)), request_uuid="u-2")))
    sink.flush()
    ch.command("SYSTEM START MERGES")
    ch.command("OPTIMIZE TABLE review_images FINAL")
    ch.command("OPTIMIZE TABLE review_image_refs FINAL")
    assert ch.query("SELECT count() FROM review_images").result_rows == [(1,)]
    assert ch.query("SELECT request_uuid FROM review_image_refs").result_rows == [("u-2",)]
