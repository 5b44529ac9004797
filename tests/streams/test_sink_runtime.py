"""The sink role's runtime over the embedded ClickHouse: Kafka timestamps and readiness.

Uses the suite's one chDB engine directory (see tests/processors/analytics/test_sink.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from processors.analytics.rejections import FAILURES_TABLE
from processors.analytics.rows import COLUMNS
from processors.records import CategoryTag, SourcePosition, TopCategory
from streams.agents import kafka_timestamp_ms
from streams.codecs import Codecs
from streams.handlers import RawMessage
from streams.metrics import Metrics
from streams.runtime import SinkRuntime
from streams.settings import Settings

# 2024-05-31T23:59:59.500Z: the last half second of a month, long before the test runs.
KAFKA_TS = 1_717_199_999_500


@pytest.fixture
def ch(module_client: Any) -> Any:
    module_client.command("SYSTEM STOP MERGES")
    for table in [*COLUMNS, FAILURES_TABLE]:
        module_client.command(f"TRUNCATE TABLE {table}")
    return module_client


def as_utc(value: datetime) -> datetime:
    """chDB returns DateTime64(3, 'UTC') values naive."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def tag_message(offset: int) -> RawMessage:
    event = CategoryTag(
        product_id=f"P{offset}",
        category="bags",
        score=0.75,
        top_categories=(TopCategory("bags", 0.75),),
        tags=("leather",),
        model_version="cat-3",
        idempotency_key=f"tag-key-{offset}",
        used_image=False,
        source=SourcePosition("product-listed", 0, offset),
    ).to_event()
    value = Codecs().for_schema("category-tag").encode(event)
    return RawMessage("category-tag", 0, offset, None, value, timestamp_ms=KAFKA_TS + offset)


async def store_once(dsn: str, messages: list[RawMessage]) -> SinkRuntime:
    """A fresh sink process's runtime storing `messages` (then closed, as after a crash)."""
    runtime = SinkRuntime(Settings(clickhouse_dsn=dsn), Metrics())
    await runtime.start()
    try:
        await runtime.store(messages)
    finally:
        await runtime.stop()
    return runtime


async def test_the_kafka_timestamp_is_stored_and_copies_of_a_message_collapse(
    ch: Any, dsn: str
) -> None:
    await store_once(dsn, [tag_message(0), tag_message(1)])
    # A re-read with other boundaries (offsets 1-2 after 0-1): offset 1 is written again.
    await store_once(dsn, [tag_message(1), tag_message(2)])
    rows = ch.query(
        "SELECT source_offset, event_time, kafka_time, version, _partition_id "
        "FROM category_tags ORDER BY source_offset"
    ).result_rows
    assert [r[0] for r in rows] == [0, 1, 1, 2]
    for offset, event_time, kafka_time, version, partition in rows:
        expected = datetime.fromtimestamp((KAFKA_TS + offset) / 1000, UTC)
        assert as_utc(kafka_time) == expected and version == KAFKA_TS + offset
        assert as_utc(event_time) == expected  # category-tag has no time of its own: the fallback
        assert partition == "202405"
    copies = [r for r in rows if r[0] == 1]
    assert copies[0] == copies[1]  # identical copies, one partition: FINAL collapses them
    assert ch.query("SELECT count() FROM category_tags FINAL").result_rows == [(3,)]


def test_faust_message_timestamps_become_kafka_milliseconds() -> None:
    assert kafka_timestamp_ms(1_717_199_999.5) == KAFKA_TS
    assert kafka_timestamp_ms(None) is None
    assert kafka_timestamp_ms(-0.001) is None  # Kafka's "no timestamp" is -1 ms


async def test_readiness_tells_rejected_rows_from_an_unreachable_database(
    ch: Any, dsn: str
) -> None:
    ch.command("ALTER TABLE category_tags ADD CONSTRAINT no_p7 CHECK product_id != 'P7'")
    try:
        runtime = await store_once(dsn, [tag_message(n) for n in range(6, 9)])
        assert runtime.sink_reachable() and not runtime.sink_accepting_rows()
        exposition = runtime.metrics.render()[0].decode()
        assert "visionstream_sink_failed_rows_total 1.0" in exposition
        assert ch.query(f"SELECT source_offset FROM {FAILURES_TABLE}").result_rows == [(7,)]
    finally:
        ch.command("ALTER TABLE category_tags DROP CONSTRAINT no_p7")
    runtime = SinkRuntime(Settings(clickhouse_dsn=dsn), Metrics())
    await runtime.start()
    try:
        await runtime.store([tag_message(20)])
        assert runtime.sink_reachable() and runtime.sink_accepting_rows()
    finally:
        await runtime.stop()
