"""The ClickHouse analytics sink, against the embedded chDB engine.

chDB hosts one engine path per process (a second path opens only after every client
of the first is closed), so every chDB test module of this suite uses the same
directory, `<pytest basetemp>/chdb-engine`, and one client per module; tables are
truncated between tests (TRUNCATE also clears the insert deduplication log), and
background merges are stopped so that raw copy counts are deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import pytest

from processors.analytics.client import DEDUP_SETTING, SinkUnavailable
from processors.analytics.reports import run_report
from processors.analytics.rows import COLUMNS, POSITION_COLUMNS, SinkRecord, rows_for
from processors.analytics.sink import AnalyticsSink
from processors.errors import ErrorCode, Failure
from processors.records import (
    Analysis,
    CategoryTag,
    DeadLetter,
    PickupRequest,
    ProductListing,
    QuestionAnswer,
    SourcePosition,
    TopCategory,
    VerificationAttempt,
    VerificationDecision,
    input_key,
)

T0 = 1_714_557_600_000  # 2024-05-01T10:00:00Z
EVER = timedelta(days=3650)
MAY_1 = date(2024, 5, 1)


@pytest.fixture
def ch(module_client: Any) -> Any:
    """The module's client over freshly emptied tables, background merges stopped.

    Merges would collapse duplicates at random moments; tests that count raw copies
    need them stopped (a table created later, e.g. by the migration test, is not
    covered by an earlier STOP MERGES). Reports must not depend on merges anyway.
    """
    module_client.command("SYSTEM STOP MERGES")
    for table in COLUMNS:
        module_client.command(f"TRUNCATE TABLE {table}")
    return module_client


@pytest.fixture
def sinks(dsn: str) -> Iterator[list[AnalyticsSink]]:
    """Sinks a test creates; all closed at its end."""
    made: list[AnalyticsSink] = []
    yield made
    for sink in made:
        sink.close()


def new_sink(sinks: list[AnalyticsSink], dsn: str, **kwargs: Any) -> AnalyticsSink:
    sink = AnalyticsSink(dsn, **kwargs)
    sink.setup()
    sinks.append(sink)
    return sink


def count(ch: Any, sql: str) -> Any:
    return ch.query(sql).result_rows[0][0]


# ------------------------------------------------------------------------- events


def pickup(event_id: str, *, uuid: str = "u-1", productid: str | None = "P1") -> dict[str, Any]:
    return PickupRequest(
        event_id=event_id,
        occurred_at_ms=T0,
        shippingid="S-1",
        uuid=uuid,
        productname="Blue Shoe",
        question='[{"Type": "boolean", "Label": "Color"}]',
        pickupproductimage=("https://cdn.example/v1.jpg",),
        skupickdone=("https://cdn.example/p1.jpg", "aGVsbG8="),
        productid=productid,
        previousuuid="u-0",
    ).to_event()


def answer(label: str, retake: bool) -> QuestionAnswer:
    return QuestionAnswer(
        type="boolean",
        label=label,
        is_mandatory="true",
        value_to_check="blue",
        answer="yes",
        evidence="blue upper",
        confidence=91.5,
        is_retake_image="true" if retake else "false",
    )


def decision(
    key: str, *, ai: str = "Pick", when: str = "2024-05-01T10:00:00+00:00"
) -> dict[str, Any]:
    return VerificationDecision(
        shippingid="S-1",
        uuid="u-1",
        product_id="P1",
        questions=(answer("Color", False), answer("Brand", True), answer("Size", False)),
        ai_decision=ai,
        final_action=ai,
        ai_match_score=87.0,
        analysis=Analysis("a blue shoe", "a blue shoe", "same"),
        status="success",
        status_code=200 if ai == "Pick" else 202,
        processing_time_ai=1.25,
        total_time=2.5,
        timestamp=when,
        model_version="internvl-1",
        recommendation="Accept",
        idempotency_key=key,
        source=SourcePosition("pickup-completed", 2, 41),
    ).to_event()


def attempt(key: str, number: int, status: str) -> dict[str, Any]:
    return VerificationAttempt(
        request_uuid="u-1",
        shippingid="S-1",
        attempt=number,
        prompt_hash="ab12cd34ef56ab78",
        raw_output='{"overall_score": 87}' if status == "valid" else "not json",
        validation_status=status,
        validation_error="" if status == "valid" else "no JSON object",
        model_version="internvl-1",
        batch_id="b-7",
        batch_size=4,
        gather_ms=12.5,
        model_ms=800.0,
        idempotency_key=key,
        occurred_at_ms=T0,
    ).to_event()


def listing(event_id: str) -> dict[str, Any]:
    return ProductListing(
        event_id=event_id,
        occurred_at_ms=T0,
        product_id="P9",
        title="Leather bag",
        description="brown",
        image="https://cdn.example/bag.jpg",
        top_k_tags=3,
    ).to_event()


def tag(key: str) -> dict[str, Any]:
    return CategoryTag(
        product_id="P9",
        category="bags",
        score=0.75,
        top_categories=(TopCategory("bags", 0.75), TopCategory("shoes", 0.2)),
        tags=("leather", "brown"),
        model_version="cat-3",
        idempotency_key=key,
        used_image=False,
        source=SourcePosition("product-listed", 0, 8),
    ).to_event()


def dead_letter() -> dict[str, Any]:
    return DeadLetter(
        original_value=b"\x00\xffnot avro",
        original_key=b"S-1",
        source=SourcePosition("pickup-completed", 1, 77),
        error_code=int(ErrorCode.MODEL_OUTPUT_INVALID),
        error_name="MODEL_OUTPUT_INVALID",
        error_message="no JSON object, twice",
        stage="model",
        failed_at_ms=T0,
        request_uuid="u-1",
        shippingid="S-1",
        extra={"raw_output_1": "oops"},
    ).to_event()


def rec(topic: str, offset: int, value: dict[str, Any], partition: int = 0) -> SinkRecord:
    return SinkRecord(topic, partition, offset, value, T0 + offset)


def one_of_each() -> list[SinkRecord]:
    key = input_key("pickup-completed", {"event_id": "e-1"})
    return [
        rec("pickup-completed", 5, pickup("e-1")),
        rec("product-listed", 8, listing("l-1")),
        rec("verification-decision", 3, decision(key)),
        rec("verification-attempts", 6, attempt(key, 1, "invalid")),
        rec("verification-attempts", 7, attempt(key, 2, "valid")),
        rec("category-tag", 2, tag("tag-key-1")),
        rec("dead-letter", 0, dead_letter()),
    ]


class FlakyClient:
    """A real client whose inserts can be made to fail: the constructor seam for outages."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = False
        self.fail_on: set[int] = set()  # 0-based numbers of insert calls that fail
        self.tokens: list[str] = []

    def insert(
        self,
        table: str | None = None,
        data: Any = None,
        column_names: Any = "*",
        database: Any = None,
        column_types: Any = None,
        column_type_names: Any = None,
        column_oriented: bool = False,
        settings: Any = None,
    ) -> Any:
        call = len(self.tokens)
        self.tokens.append(settings[DEDUP_SETTING])
        if self.down or call in self.fail_on:
            raise ConnectionError("Connection refused by clickhouse:8123")
        return self.inner.insert(table, data, column_names=column_names, settings=settings)

    def query(self, query: str | None = None, parameters: Any = None, settings: Any = None) -> Any:
        return self.inner.query(query, parameters=parameters, settings=settings)

    def command(
        self, cmd: str, parameters: Any = None, data: Any = None, settings: Any = None
    ) -> Any:
        return self.inner.command(cmd, parameters=parameters, data=data, settings=settings)

    def close(self) -> None:
        """The module owns the inner client."""


# -------------------------------------------------------------------------- tests


def test_columns_match_the_ddl(ch: Any) -> None:
    for table, columns in COLUMNS.items():
        described = [row[0] for row in ch.query(f"DESCRIBE TABLE {table}").result_rows]
        assert described == [*columns, *POSITION_COLUMNS, "ingested_at"], table
        assert "non_replicated_deduplication_window = 1000" in ch.command(
            f"SHOW CREATE TABLE {table}"
        )


def test_every_table_receives_its_rows(ch: Any, dsn: str, sinks: list[AnalyticsSink]) -> None:
    sink = new_sink(sinks, dsn)
    for record in one_of_each():
        assert sink.add(record) is None
    result = sink.flush()
    assert result.offsets == {
        ("pickup-completed", 0): 5,
        ("product-listed", 0): 8,
        ("verification-decision", 0): 3,
        ("verification-attempts", 0): 7,
        ("category-tag", 0): 2,
        ("dead-letter", 0): 0,
    }
    assert result.commit_offsets()[("verification-attempts", 0)] == 8
    assert result.rows == {
        "pickup_requests": 1,
        "inference_attempts": 2,
        "verification_decisions": 1,
        "question_answers": 3,
        "product_listings": 1,
        "category_tags": 1,
        "dead_letters": 1,
    }
    key = input_key("pickup-completed", {"event_id": "e-1"})

    pickups = ch.query(
        "SELECT event_time, idempotency_key, productid, is_retake, vendor_images, "
        "pickup_image_count, pickup_image_urls, source_topic, source_partition, source_offset "
        "FROM pickup_requests"
    ).result_rows
    assert len(pickups) == 1
    assert pickups[0][0].isoformat() == "2024-05-01T10:00:00"
    assert pickups[0][1:] == (
        key, "P1", True, ["https://cdn.example/v1.jpg"], 2, ["https://cdn.example/p1.jpg"],
        "pickup-completed", 0, 5,
    )  # fmt: skip

    decisions = ch.query(
        "SELECT idempotency_key, toString(ai_decision), final_action, status_code, total_time, "
        "question_count, retake_question_count, retake_requested, comparison, "
        "input_topic, input_partition, input_offset, source_offset, version "
        "FROM verification_decisions"
    ).result_rows
    assert decisions == [
        (key, "Pick", "Pick", 200, 2.5, 3, 1, True, "same", "pickup-completed", 2, 41, 3, T0 + 3)
    ]

    answers = ch.query(
        "SELECT question_index, label, is_mandatory, is_retake_image, confidence, ai_decision "
        "FROM question_answers ORDER BY question_index"
    ).result_rows
    assert answers == [
        (0, "Color", True, False, 91.5, "Pick"),
        (1, "Brand", True, True, 91.5, "Pick"),
        (2, "Size", True, False, 91.5, "Pick"),
    ]

    attempts = ch.query(
        "SELECT attempt, validation_status, validation_error, raw_output, prompt_hash, "
        "model_version, batch_id, batch_size, gather_ms, model_ms, source_offset "
        "FROM inference_attempts ORDER BY attempt"
    ).result_rows
    assert attempts == [
        (1, "invalid", "no JSON object", "not json", "ab12cd34ef56ab78", "internvl-1", "b-7", 4,
         12.5, 800.0, 6),
        (2, "valid", "", '{"overall_score": 87}', "ab12cd34ef56ab78", "internvl-1", "b-7", 4,
         12.5, 800.0, 7),
    ]  # fmt: skip

    listings = ch.query(
        "SELECT product_id, has_image, image_url, top_k_tags, source_offset FROM product_listings"
    ).result_rows
    assert listings == [("P9", True, "https://cdn.example/bag.jpg", 3, 8)]

    tags = ch.query(
        "SELECT idempotency_key, category, score, top_categories, top_probs, tags, used_image, "
        "input_topic, input_offset, event_time FROM category_tags"
    ).result_rows
    assert tags[0][:9] == (
        "tag-key-1", "bags", 0.75, ["bags", "shoes"], [0.75, 0.2], ["leather", "brown"], False,
        "product-listed", 8,
    )  # fmt: skip
    assert tags[0][9].isoformat() == "2024-05-01T10:00:00.002000"  # the Kafka timestamp

    letters = ch.query(
        "SELECT hex(original_value), original_key, original_size, original_topic, "
        "original_partition, original_offset, error_code, error_name, stage, extra, "
        "source_topic, source_offset FROM dead_letters"
    ).result_rows
    assert letters == [
        (b"\x00\xffnot avro".hex().upper(), "S-1", 10, "pickup-completed", 1, 77, 1301,
         "MODEL_OUTPUT_INVALID", "model", {"raw_output_1": "oops"}, "dead-letter", 0),
    ]  # fmt: skip


def test_same_batch_flushed_twice_by_a_new_sink_leaves_one_copy(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    first = new_sink(sinks, dsn)
    for record in one_of_each():
        first.add(record)
    first.flush()
    first.close()
    # A crash before Kafka was acknowledged: a new process re-reads the same records.
    second = new_sink(sinks, dsn)
    for record in one_of_each():
        second.add(record)
    second.flush()
    for table, expected in {
        "pickup_requests": 1,
        "inference_attempts": 2,
        "verification_decisions": 1,
        "question_answers": 3,
        "product_listings": 1,
        "category_tags": 1,
        "dead_letters": 1,
    }.items():
        # Plain count() without FINAL: the server dropped the retried inserts.
        assert count(ch, f"SELECT count() FROM {table}") == expected, table


def test_a_partial_re_read_with_other_boundaries_counts_once(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    records = [
        rec("verification-decision", i, decision(f"key-{i}", when="2024-05-01T10:00:00Z"))
        for i in range(8)
    ]
    first = new_sink(sinks, dsn)
    for record in records[:5]:
        first.add(record)
    first.flush()
    second = new_sink(sinks, dsn)  # re-reads offsets 2..7: other boundaries, other token
    for record in records[2:]:
        second.add(record)
    second.flush()
    assert count(ch, "SELECT count() FROM verification_decisions") == 11  # 3 stored twice
    report = run_report(ch, "decisions_per_day", EVER)
    assert report.rows == ((MAY_1, "Pick", 8),)


def test_duplicate_decision_from_another_offset_counts_once_and_the_latest_wins(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn)
    sink.add(rec("verification-decision", 10, decision("key-a", ai="Pick")))
    sink.add(rec("verification-decision", 11, decision("key-b", ai="Pick")))
    sink.flush()
    # The upstream input was redelivered and decided again, later, differently.
    sink.add(rec("verification-decision", 20, decision("key-a", ai="Not Pick")))
    sink.flush()
    assert count(ch, "SELECT count() FROM verification_decisions") == 3  # before any merge
    assert count(ch, "SELECT count() FROM question_answers") == 9
    report = run_report(ch, "decisions_per_day", EVER)
    assert report.rows == (
        (MAY_1, "Pick", 1),
        (MAY_1, "Not Pick", 1),
    )
    by_question = run_report(ch, "retake_rate_by_question", EVER)
    assert {row[0]: row[1] for row in by_question.rows} == {"Brand": 2, "Color": 2, "Size": 2}
    # Within one insert, ReplacingMergeTree already collapses a key (highest version).
    sink.add(rec("verification-decision", 30, decision("key-c", ai="Pick")))
    sink.add(rec("verification-decision", 31, decision("key-c", ai="Not Pick")))
    sink.flush()
    kept = ch.query(
        "SELECT ai_decision FROM verification_decisions WHERE idempotency_key = 'key-c'"
    )
    assert kept.result_rows == [("Not Pick",)]


def test_outage_keeps_the_buffer_and_a_later_flush_delivers_exactly_once(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    flaky = FlakyClient(ch)
    sink = AnalyticsSink(dsn, client_factory=lambda _dsn: flaky)
    sink.setup()
    sinks.append(sink)
    records = one_of_each()
    for record in records[:4]:
        sink.add(record)
    buffered = sink.buffered_rows()
    flaky.down = True
    with pytest.raises(SinkUnavailable, match="batches kept for retry") as failure:
        sink.flush()
    assert "Connection refused" in str(failure.value)
    assert sink.buffered_rows() == buffered
    assert count(ch, "SELECT count() FROM pickup_requests") == 0
    failed_tokens = list(flaky.tokens)

    for record in records[4:]:  # consumption goes on while ClickHouse is down
        sink.add(record)
    with pytest.raises(SinkUnavailable):
        sink.flush()

    flaky.down = False
    flaky.tokens.clear()
    result = sink.flush()
    assert flaky.tokens[0] == failed_tokens[0]  # the same batch, the same token
    assert set(failed_tokens) <= set(flaky.tokens)
    assert result.offsets[("pickup-completed", 0)] == 5
    assert result.offsets[("dead-letter", 0)] == 0
    assert sink.buffered_rows() == 0
    assert count(ch, "SELECT count() FROM question_answers") == 3
    assert count(ch, "SELECT count() FROM inference_attempts") == 2
    assert count(ch, "SELECT count() FROM dead_letters") == 1
    assert sink.flush().offsets == {}  # nothing left, nothing sent twice


def test_an_outage_in_the_middle_of_a_flush_resends_only_what_failed(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    flaky = FlakyClient(ch)
    flaky.fail_on = {1}  # the second insert of the flush fails
    sink = AnalyticsSink(dsn, client_factory=lambda _dsn: flaky)
    sink.setup()
    sinks.append(sink)
    for record in one_of_each():
        sink.add(record)
    with pytest.raises(SinkUnavailable):
        sink.flush()
    result = sink.flush()
    assert flaky.tokens[2] == flaky.tokens[1]  # the failed batch is retried first
    assert flaky.tokens.count(flaky.tokens[0]) == 1  # the written one is not resent
    assert len(result.offsets) == 6
    total = sum(count(ch, f"SELECT count() FROM {table}") for table in COLUMNS)
    assert total == 10


def test_bad_records_are_returned_as_failures_and_never_stop_the_flush(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn)
    unknown = sink.add(rec("some-other-topic", 4, {"x": 1}))
    bad_enum = sink.add(rec("verification-decision", 1, decision("k", ai="Maybe")))
    bad_status = sink.add(
        rec("verification-attempts", 2, {**attempt("k", 1, "valid"), "validation_status": "ok"})
    )
    bad_type = sink.add(rec("category-tag", 3, {**tag("k"), "score": "high"}))
    assert sink.add(rec("category-tag", 4, tag("k2"))) is None
    for failure in (unknown, bad_enum, bad_status, bad_type):
        assert isinstance(failure, Failure)
        assert failure.code == ErrorCode.INVALID_EVENT and failure.stage == "sink"
    assert unknown is not None and "some-other-topic" in unknown.message
    result = sink.flush()
    assert result.rejected == 4 and sink.rejected_total == 4
    assert result.offsets[("some-other-topic", 0)] == 4  # handled: the caller may move on
    assert result.offsets[("category-tag", 0)] == 4
    assert count(ch, "SELECT count() FROM category_tags") == 1
    assert count(ch, "SELECT count() FROM verification_decisions") == 0
    not_a_mapping = rows_for(SinkRecord("category-tag", 0, 0, [1, 2], T0))  # type: ignore[arg-type]
    assert isinstance(not_a_mapping, Failure)


def test_should_flush_on_row_count_or_interval(dsn: str) -> None:
    now = [100.0]
    sink = AnalyticsSink(dsn, max_rows=4, max_interval_s=2.0, clock=lambda: now[0])
    assert not sink.should_flush()
    sink.add(rec("verification-attempts", 0, attempt("k", 1, "valid")))
    assert not sink.should_flush()
    now[0] += 2.0
    assert sink.should_flush()  # the interval passed
    now[0] = 100.0
    sink2 = AnalyticsSink(dsn, max_rows=4, max_interval_s=2.0, clock=lambda: now[0])
    sink2.add(rec("verification-decision", 0, decision("k")))  # 1 decision + 3 answers
    assert sink2.should_flush()
    with pytest.raises(RuntimeError, match="setup"):
        sink2.flush()
    with pytest.raises(ValueError):
        AnalyticsSink(dsn, max_rows=0)


def test_inserts_are_cut_at_aligned_offset_blocks_so_a_re_read_repeats_tokens(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    def attempts(offsets: range) -> list[SinkRecord]:
        return [rec("verification-attempts", i, attempt(f"k-{i}", 1, "valid"), 3) for i in offsets]

    flaky = FlakyClient(ch)
    sink = AnalyticsSink(dsn, offset_block=10, client_factory=lambda _dsn: flaky)
    sink.setup()
    sinks.append(sink)
    for record in attempts(range(5, 25)):
        sink.add(record)
    assert sink.flush().offsets == {("verification-attempts", 3): 24}
    assert flaky.tokens == [
        "inference_attempts:verification-attempts:3:5-9",
        "inference_attempts:verification-attempts:3:10-19",
        "inference_attempts:verification-attempts:3:20-24",
    ]
    # Offsets at or below what this sink sealed are re-reads: skipped.
    assert sink.add(attempts(range(7, 8))[0]) is None and sink.duplicates_skipped == 1
    # A new process re-reads from offset 10: the full block repeats its token.
    flaky.tokens.clear()
    again = AnalyticsSink(dsn, offset_block=10, client_factory=lambda _dsn: flaky)
    again.setup()
    for record in attempts(range(10, 23)):
        again.add(record)
    again.flush()
    assert flaky.tokens[0] == "inference_attempts:verification-attempts:3:10-19"
    assert count(ch, "SELECT count() FROM inference_attempts") == 20 + 3  # 20-22 twice
    assert count(ch, "SELECT count() FROM inference_attempts FINAL") == 20
