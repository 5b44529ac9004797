"""Inserts ClickHouse rejects: split, isolate, record in sink_failures, move on (embedded chDB).

Uses the suite's one chDB engine directory (see tests/processors/analytics/test_sink.py).
The rejections are real: a block spanning 240 month partitions (code 252), and a CHECK
constraint added to a table (code 469) that one row breaks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError

from processors.analytics.client import DEDUP_SETTING, SinkUnavailable
from processors.analytics.rejections import FAILURES_TABLE, rejection_code, split_rows
from processors.analytics.rows import COLUMNS, SinkRecord
from processors.analytics.sink import AnalyticsSink
from processors.records import CategoryTag, PickupRequest, SourcePosition, TopCategory

T0 = 1_714_557_600_000  # 2024-05-01T10:00:00Z


@pytest.fixture
def ch(module_client: Any) -> Any:
    """Emptied tables (and deduplication logs), merges stopped so raw copies can be counted."""
    module_client.command("SYSTEM STOP MERGES")
    for table in [*COLUMNS, FAILURES_TABLE]:
        module_client.command(f"TRUNCATE TABLE {table}")
    return module_client


@pytest.fixture
def sinks() -> Iterator[list[AnalyticsSink]]:
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


def month_start_ms(index: int) -> int:
    """Epoch ms of the first day of month `index` counted from January 2000."""
    year, month = divmod(index, 12)
    return int(datetime(2000 + year, month + 1, 1, 12, tzinfo=UTC).timestamp() * 1000)


def backfill_pickup(n: int) -> dict[str, Any]:
    return PickupRequest(
        event_id=f"backfill-{n}",
        occurred_at_ms=month_start_ms(n),
        shippingid=f"S-{n}",
        uuid=f"u-{n}",
        productname="Blue Shoe",
        question='[{"Type": "boolean", "Label": "Color"}]',
        pickupproductimage=("https://cdn.example/v1.jpg",),
        skupickdone=("https://cdn.example/p1.jpg",),
        productid="P1",
    ).to_event()


def tag(n: int, product_id: str) -> dict[str, Any]:
    return CategoryTag(
        product_id=product_id,
        category="bags",
        score=0.75,
        top_categories=(TopCategory("bags", 0.75),),
        tags=("leather",),
        model_version="cat-3",
        idempotency_key=f"tag-key-{n}",
        used_image=False,
        source=SourcePosition("product-listed", 0, n),
    ).to_event()


def tags(bad: set[int], total: int = 50) -> list[SinkRecord]:
    return [
        SinkRecord("category-tag", 0, n, tag(n, "BAD" if n in bad else f"P{n}"), T0 + n)
        for n in range(total)
    ]


@pytest.fixture
def no_bad_products(ch: Any) -> Iterator[None]:
    """A CHECK constraint on category_tags that rows with product_id 'BAD' break (code 469)."""
    ch.command("ALTER TABLE category_tags ADD CONSTRAINT no_bad_product CHECK product_id != 'BAD'")
    try:
        yield
    finally:
        ch.command("ALTER TABLE category_tags DROP CONSTRAINT no_bad_product")


class FailingClient:
    """A real client whose inserts raise `error` on chosen call numbers (0-based)."""

    def __init__(self, inner: Any, fail_on: set[int], error: Exception | None = None) -> None:
        self.inner = inner
        self.fail_on = fail_on
        self.error = error or ConnectionError("Connection reset by clickhouse:8123")
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
        if call in self.fail_on:
            raise self.error
        return self.inner.insert(table, data, column_names=column_names, settings=settings)

    def query(self, query: str | None = None, parameters: Any = None, settings: Any = None) -> Any:
        return self.inner.query(query, parameters=parameters, settings=settings)

    def command(
        self, cmd: str, parameters: Any = None, data: Any = None, settings: Any = None
    ) -> Any:
        return self.inner.command(cmd, parameters=parameters, data=data, settings=settings)

    def close(self) -> None:
        """The module owns the inner client."""


# ------------------------------------------------------------------------------- tests


def test_a_backfill_spanning_240_months_in_one_partition_is_stored_whole(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    sink = new_sink(sinks, dsn, max_rows=1000)
    for n in range(240):
        assert sink.add(SinkRecord("pickup-completed", 0, n, backfill_pickup(n), T0 + n)) is None
    result = sink.flush()  # before: code 252, SinkUnavailable, the sink retried forever
    assert result.offsets == {("pickup-completed", 0): 239}
    assert result.failed_rows == 0 and result.splits >= 1
    assert result.rows["pickup_requests"] == 240
    stored = ch.query(
        "SELECT count(), uniqExact(toYYYYMM(event_time)), uniqExact(event_id) FROM pickup_requests"
    ).result_rows[0]
    assert stored == (240, 240, 240)
    assert count(ch, f"SELECT count() FROM {FAILURES_TABLE}") == 0


def test_one_row_clickhouse_rejects_goes_to_sink_failures_and_the_rest_is_stored(
    ch: Any, dsn: str, sinks: list[AnalyticsSink], no_bad_products: None
) -> None:
    sink = new_sink(sinks, dsn)
    for record in tags(bad={17}):
        sink.add(record)
    result = sink.flush()
    assert result.offsets == {("category-tag", 0): 49}  # the sink moves on past the bad row
    assert result.failed_rows == 1 and sink.failed_rows_total == 1
    assert count(ch, "SELECT count() FROM category_tags") == 49
    assert count(ch, "SELECT countIf(product_id = 'BAD') FROM category_tags") == 0
    failures = ch.query(
        "SELECT target_table, error_code, error_message, row_json, source_topic, "
        f"source_partition, source_offset, kafka_time FROM {FAILURES_TABLE}"
    ).result_rows
    assert len(failures) == 1
    table, code, message, row_json, topic, partition, offset, kafka_time = failures[0]
    assert (table, code, topic, partition, offset) == ("category_tags", 469, "category-tag", 0, 17)
    assert "no_bad_product" in message
    row = json.loads(row_json)
    assert row["product_id"] == "BAD" and row["idempotency_key"] == "tag-key-17"
    assert int(kafka_time.replace(tzinfo=UTC).timestamp() * 1000) == T0 + 17  # naive UTC


def test_a_re_read_after_a_crash_stores_each_row_once_and_records_the_failure_once(
    ch: Any, dsn: str, sinks: list[AnalyticsSink], no_bad_products: None
) -> None:
    for _ in range(2):  # the second sink re-reads the same block: same parts, same tokens
        sink = new_sink(sinks, dsn)
        for record in tags(bad={3, 40}):
            sink.add(record)
        assert sink.flush().failed_rows == 2
    assert count(ch, "SELECT count() FROM category_tags") == 48  # raw: no copy written twice
    assert count(ch, f"SELECT count() FROM {FAILURES_TABLE}") == 2


def test_a_connection_error_during_the_split_keeps_the_rest_and_a_retry_finishes(
    ch: Any, dsn: str, sinks: list[AnalyticsSink], no_bad_products: None
) -> None:
    failing = FailingClient(ch, fail_on={2})  # the second part of the split
    sink = AnalyticsSink(dsn, client_factory=lambda _dsn: failing)
    sink.setup()
    sinks.append(sink)
    for record in tags(bad={45}):
        sink.add(record)
    with pytest.raises(SinkUnavailable, match="Connection reset"):
        sink.flush()  # nothing acknowledged
    assert sink.buffered_rows() > 0
    result = sink.flush()
    assert result.offsets == {("category-tag", 0): 49} and result.failed_rows == 1
    assert count(ch, "SELECT count() FROM category_tags") == 49
    assert count(ch, f"SELECT count() FROM {FAILURES_TABLE}") == 1


def test_a_server_error_that_is_not_about_the_rows_is_retried_never_split(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    missing = DatabaseError("Code: 60. DB::Exception: Table default.category_tags does not exist")
    failing = FailingClient(ch, fail_on=set(range(100)), error=missing)
    sink = AnalyticsSink(dsn, client_factory=lambda _dsn: failing)
    sink.setup()
    sinks.append(sink)
    for record in tags(bad=set(), total=4):
        sink.add(record)
    for _ in range(2):
        with pytest.raises(SinkUnavailable, match="Code: 60"):
            sink.flush()
    assert len(failing.tokens) == 2 and len(set(failing.tokens)) == 1  # the same whole batch
    assert sink.buffered_rows() == 4
    assert count(ch, f"SELECT count() FROM {FAILURES_TABLE}") == 0


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConnectionError("refused"), None),
        (TimeoutError("timed out"), None),
        (OperationalError("Error HTTPConnectionPool ... executing HTTP request"), None),
        (DatabaseError("Code: 60. DB::Exception: Unknown table"), None),
        (DatabaseError("Code: 516. DB::Exception: default: Authentication failed"), None),
        (DatabaseError("Code: 252. DB::Exception: Too many parts (300). Merges are slower"), None),
        (
            DatabaseError(
                "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)"
            ),
            252,
        ),
        (DatabaseError("Code: 469. DB::Exception: Constraint `c` is violated at row 1"), 469),
        (DatabaseError("Code: 691. DB::Exception: Unknown element 'Maybe' for enum"), 691),
        (DataError("Invalid value for column"), 0),
        (TypeError("object of type 'int' has no len()"), 0),
        (OverflowError("int too big to convert"), 0),
        (RuntimeError("something else"), None),
    ],
)
def test_rejections_are_told_from_transient_failures(error: Exception, code: int | None) -> None:
    assert rejection_code(error) == code


def row_in(year: int, month: int, n: int = 0) -> tuple[Any, ...]:
    return (datetime(year, month, 1, tzinfo=UTC), n)


def test_split_by_month_runs_then_halves_of_months_then_halves_of_rows() -> None:
    rows = [row_in(2000 + i // 12, i % 12 + 1, i) for i in range(240)]
    parts = split_rows(rows, max_partitions=100)
    assert [label for label, _ in parts] == ["m200001-200804", "m200805-201608", "m201609-201912"]
    assert [len(p) for _, p in parts] == [100, 100, 40]
    assert sorted(r for _, p in parts for r in p) == sorted(rows)

    two_months = [row_in(2024, 5, 0), row_in(2024, 6, 1), row_in(2024, 5, 2)]
    assert split_rows(two_months) == [
        ("m202405-202405", (two_months[0], two_months[2])),
        ("m202406-202406", (two_months[1],)),
    ]
    one_month = [row_in(2024, 5, n) for n in range(5)]
    assert split_rows(one_month) == [("r0-1", tuple(one_month[:2])), ("r2-4", tuple(one_month[2:]))]
    assert split_rows(one_month[:1]) == []
    assert split_rows(rows) == split_rows(list(rows))  # stable labels: stable tokens
