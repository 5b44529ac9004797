"""Named reports on a known data set, loaded through the sink into embedded chDB.

The expected numbers below are computed by hand from the data set (see the comments
at each event). chDB hosts one engine path per process, so this module uses the same
directory as test_sink.py (`<pytest basetemp>/chdb-engine`); it empties the tables
and loads the data once, then only reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from processors.analytics.client import open_client
from processors.analytics.migrations import apply_migrations
from processors.analytics.reports import (
    ReportResult,
    format_table,
    list_reports,
    parse_since,
    report_description,
    run_query,
    run_report,
    to_json,
)
from processors.analytics.rows import COLUMNS, SinkRecord
from processors.analytics.sink import AnalyticsSink
from processors.errors import ErrorCode
from processors.records import (
    Analysis,
    CategoryTag,
    DeadLetter,
    PickupRequest,
    QuestionAnswer,
    SourcePosition,
    VerificationAttempt,
    VerificationDecision,
)

NOW = datetime(2024, 5, 10, tzinfo=UTC)
WEEK = timedelta(days=7)  # from 2024-05-03: the April events fall outside
MAY_8, MAY_9, APR_1 = date(2024, 5, 8), date(2024, 5, 9), date(2024, 4, 1)


def ms(day: date, hour: int) -> int:
    return int(datetime(day.year, day.month, day.day, hour, tzinfo=UTC).timestamp() * 1000)


def question(label: str, retake: bool) -> QuestionAnswer:
    return QuestionAnswer(
        "boolean", label, "true", "yes", "yes", "seen", 80.0, "true" if retake else "false"
    )


def decision(
    key: str, product: str | None, ai: str, day: date, total: float, ai_time: float, *qs: Any
) -> dict[str, Any]:
    return VerificationDecision(
        shippingid=f"S-{key}",
        uuid=f"u-{key}",
        product_id=product,
        questions=tuple(question(label, retake) for label, retake in qs),
        ai_decision=ai,
        final_action=ai,
        ai_match_score=70.0,
        analysis=Analysis(),
        status="success",
        status_code=200,
        processing_time_ai=ai_time,
        total_time=total,
        timestamp=datetime(day.year, day.month, day.day, 12, tzinfo=UTC).isoformat(),
        model_version="m1",
        recommendation="Accept",
        idempotency_key=key,
    ).to_event()


def attempt(request: str, number: int, valid: bool, day: date) -> dict[str, Any]:
    return VerificationAttempt(
        request_uuid=f"u-{request}",
        shippingid=f"S-{request}",
        attempt=number,
        prompt_hash="h",
        raw_output="{}" if valid else "oops",
        validation_status="valid" if valid else "invalid",
        validation_error="" if valid else "no JSON",
        model_version="m1",
        batch_id="b",
        batch_size=2,
        gather_ms=1.0,
        model_ms=2.0,
        idempotency_key=f"key-{request}",
        occurred_at_ms=ms(day, 12),
    ).to_event()


def pickup(request: str, productid: str | None, productname: str) -> dict[str, Any]:
    return PickupRequest(
        event_id=f"e-{request}",
        occurred_at_ms=ms(MAY_8, 9),
        shippingid=f"S-{request}",
        uuid=f"u-{request}",
        productname=productname,
        question="[]",
        pickupproductimage=("https://v/1.jpg",),
        skupickdone=("https://p/1.jpg",),
        productid=productid,
    ).to_event()


def dead_letter(
    code: ErrorCode, stage: str, original: tuple[str, int, int], day: date, request: str = ""
) -> dict[str, Any]:
    return DeadLetter(
        original_value=b"{}",
        original_key=None,
        source=SourcePosition(*original),
        error_code=int(code),
        error_name=code.name,
        error_message="failed",
        stage=stage,
        failed_at_ms=ms(day, 12),
        request_uuid=f"u-{request}" if request else None,
    ).to_event()


def tag(key: str, category: str, score: float) -> dict[str, Any]:
    return CategoryTag("p", category, score, (), (), "c1", key).to_event()


def records() -> list[SinkRecord]:
    out: list[SinkRecord] = []

    def add(topic: str, value: dict[str, Any], when_ms: int) -> None:
        out.append(SinkRecord(topic, 0, len(out), value, when_ms))

    dec = "verification-decision"
    # Decisions in the week: totals [1, 2, 3, 4, 10] s, AI times [0.5, 1, 1.5, 2, 5] s.
    add(dec, decision("K1", "P1", "Pick", MAY_8, 1.0, 0.5, ("Color", False), ("Brand", False)), 1)
    add(
        dec, decision("K2", "P1", "Not Pick", MAY_8, 2.0, 1.0, ("Color", True), ("Brand", False)), 2
    )
    add(dec, decision("K3", "P2", "Pick", MAY_8, 3.0, 1.5, ("Color", True)), 3)
    add(dec, decision("K4", "P1", "Pick", MAY_9, 4.0, 2.0, ("Brand", False)), 4)
    add(
        dec,
        decision("K5", None, "Not Pick", MAY_9, 10.0, 5.0, ("Color", False), ("Size", False)),
        5,
    )
    # K5 redelivered and decided again (another offset, later): counts once.
    add(
        dec,
        decision("K5", None, "Not Pick", MAY_9, 10.0, 5.0, ("Color", False), ("Size", False)),
        6,
    )
    # Outside the week.
    add(dec, decision("K0", "P1", "Pick", APR_1, 100.0, 50.0, ("Color", True)), 7)

    att = "verification-attempts"
    add(att, attempt("A", 1, True, MAY_8), 1)  # A: valid at once
    add(att, attempt("B", 1, False, MAY_8), 1)  # B: invalid, then valid
    add(att, attempt("B", 2, True, MAY_8), 1)
    add(att, attempt("C", 1, False, MAY_8), 1)  # C: invalid twice -> dead letter 1301
    add(att, attempt("C", 2, False, MAY_8), 1)
    add(att, attempt("C", 2, False, MAY_8), 2)  # C's second attempt redelivered
    add(att, attempt("D", 1, True, MAY_9), 1)  # D: valid; its pickup is unknown
    add(att, attempt("O", 1, False, APR_1), 1)  # outside the week

    pick = "pickup-completed"
    add(pick, pickup("A", "P1", "Red Shoe"), 1)
    add(pick, pickup("B", None, "Blue Shoe"), 1)
    add(pick, pickup("C", "P2", "Green Bag"), 1)

    dl = "dead-letter"
    add(dl, dead_letter(ErrorCode.MODEL_OUTPUT_INVALID, "model", (pick, 0, 3), MAY_8, "C"), 1)
    add(dl, dead_letter(ErrorCode.IMAGE_DOWNLOAD_FAILED, "gather", (pick, 0, 7), MAY_9), 1)
    add(dl, dead_letter(ErrorCode.IMAGE_DOWNLOAD_FAILED, "gather", (pick, 0, 7), MAY_9), 2)  # again
    add(dl, dead_letter(ErrorCode.IMAGE_DOWNLOAD_FAILED, "gather", (pick, 1, 2), MAY_9), 1)
    add(
        dl, dead_letter(ErrorCode.UNDECODABLE_MESSAGE, "decode", ("product-listed", 0, 9), MAY_9), 1
    )
    add(dl, dead_letter(ErrorCode.UNDECODABLE_MESSAGE, "decode", (pick, 0, 1), APR_1), 1)

    cat = "category-tag"  # the event time of a tag is its Kafka timestamp
    add(cat, tag("L1", "shoes", 0.9), ms(MAY_8, 1))
    add(cat, tag("L2", "shoes", 0.7), ms(MAY_8, 2))
    add(cat, tag("L3", "bags", 0.6), ms(MAY_9, 1))
    add(cat, tag("L3", "bags", 0.6), ms(MAY_9, 2))  # redelivered
    add(cat, tag("L0", "bags", 0.1), ms(APR_1, 1))  # outside the week
    return out


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    dsn = f"chdb://{tmp_path_factory.getbasetemp() / 'chdb-engine'}"
    client = open_client(dsn)
    apply_migrations(client)
    # Stopped merges keep every stored duplicate, so the reports' own dedup is tested.
    client.command("SYSTEM STOP MERGES")
    for table in COLUMNS:
        client.command(f"TRUNCATE TABLE {table}")
    sink = AnalyticsSink(dsn, client_factory=lambda _dsn: client)
    sink.setup()
    # Each redelivered copy is flushed on its own, so that it is stored twice.
    for record in records():
        assert sink.add(record) is None
        sink.flush()
    yield client
    client.command("SYSTEM START MERGES")
    client.close()


def report(ch: Any, name: str, since: timedelta = WEEK) -> list[tuple[Any, ...]]:
    return list(run_report(ch, name, since, now=NOW).rows)


def test_list_reports_names_every_sql_file() -> None:
    assert set(list_reports()) >= {
        "decisions_per_day",
        "retake_rate_by_product",
        "retake_rate_by_question",
        "failure_rate",
        "failure_rate_by_product",
        "latency_percentiles",
        "dead_letters_by_reason",
        "category_distribution",
    }
    assert "Columns:" in report_description("decisions_per_day")
    for bad in ("nope", "../migrations/0001_init", "DECISIONS_PER_DAY"):
        with pytest.raises(ValueError, match="unknown report"):
            report_description(bad)


def test_the_data_set_holds_duplicates(ch: Any) -> None:
    def raw(table: str) -> int:
        return int(ch.query(f"SELECT count() FROM {table}").result_rows[0][0])

    # K5, C's second attempt, a dead letter and L3 are stored twice; reports count once.
    assert raw("verification_decisions") == 7
    assert raw("inference_attempts") == 8
    assert raw("dead_letters") == 6
    assert raw("category_tags") == 5


def test_decisions_per_day(ch: Any) -> None:
    assert report(ch, "decisions_per_day") == [
        (MAY_8, "Pick", 2),
        (MAY_8, "Not Pick", 1),
        (MAY_9, "Pick", 1),
        (MAY_9, "Not Pick", 1),
    ]
    assert report(ch, "decisions_per_day", timedelta(days=60))[0] == (APR_1, "Pick", 1)


def test_retake_rate_by_product(ch: Any) -> None:
    rows = report(ch, "retake_rate_by_product")
    # P1: K1, K2 (retake), K4 -> 1/3; P2: K3 (retake) -> 1; none: K5 -> 0.
    assert [r[:3] for r in rows] == [("P2", 1, 1), ("P1", 3, 1), ("(none)", 1, 0)]
    assert [r[3] for r in rows] == pytest.approx([1.0, 1 / 3, 0.0])


def test_retake_rate_by_question(ch: Any) -> None:
    rows = report(ch, "retake_rate_by_question")
    # Color: K1 no, K2 yes, K3 yes, K5 no; Brand: K1, K2, K4 no; Size: K5 no.
    assert rows == [("Color", 4, 2, 0.5), ("Brand", 3, 0, 0.0), ("Size", 1, 0, 0.0)]
    month = report(ch, "retake_rate_by_question", timedelta(days=60))
    assert month[0] == ("Color", 5, 3, 0.6)  # K0 adds a retake of Color


def test_failure_rate(ch: Any) -> None:
    rows = report(ch, "failure_rate")
    # May 8: requests A, B, C; attempts A1 B1 B2 C1 C2 (C2 twice, counted once); invalid
    # B1 C1 C2; one dead letter 1301 (C). May 9: D, valid.
    assert [r[:4] for r in rows] == [(MAY_8, 3, 5, 3), (MAY_9, 1, 1, 0)]
    assert [r[5] for r in rows] == [1, 0]
    assert [r[4] for r in rows] == pytest.approx([0.6, 0.0])
    assert [r[6] for r in rows] == pytest.approx([1 / 3, 0.0])


def test_failure_rate_by_product(ch: Any) -> None:
    rows = report(ch, "failure_rate_by_product")
    # A -> P1, B -> "Blue Shoe" (no productid), C -> P2, D -> no pickup event.
    assert [(r[0], r[1], r[2], r[3], r[5]) for r in rows] == [
        ("P2", 1, 2, 2, 1),
        ("(unknown)", 1, 1, 0, 0),
        ("Blue Shoe", 1, 2, 1, 0),
        ("P1", 1, 1, 0, 0),
    ]
    assert [r[4] for r in rows] == pytest.approx([1.0, 0.0, 0.5, 0.0])
    assert [r[6] for r in rows] == pytest.approx([1.0, 0.0, 0.0, 0.0])


def test_latency_percentiles(ch: Any) -> None:
    (row,) = report(ch, "latency_percentiles")
    # Linear interpolation on [1, 2, 3, 4, 10]: p50 = 3; p95 at rank 3.8 = 4 + 0.8 * 6;
    # p99 at rank 3.96 = 4 + 0.96 * 6. AI times [0.5, 1, 1.5, 2, 5] the same way.
    assert row[:2] == ("m1", 5)
    assert row[2:] == pytest.approx((3.0, 8.8, 9.76, 1.5, 4.4, 4.88))


def test_dead_letters_by_reason(ch: Any) -> None:
    # pickup-completed/0/7 failed twice (redelivery): one input, counted once.
    assert report(ch, "dead_letters_by_reason") == [
        (1201, "IMAGE_DOWNLOAD_FAILED", "gather", 2),
        (1002, "UNDECODABLE_MESSAGE", "decode", 1),
        (1301, "MODEL_OUTPUT_INVALID", "model", 1),
    ]


def test_category_distribution(ch: Any) -> None:
    rows = report(ch, "category_distribution")
    assert [r[:2] for r in rows] == [("shoes", 2), ("bags", 1)]
    assert [r[2] for r in rows] == pytest.approx([2 / 3, 1 / 3])
    assert [r[3] for r in rows] == pytest.approx([0.8, 0.6])


def test_an_empty_window_keeps_the_columns(ch: Any) -> None:
    result = run_report(ch, "category_distribution", timedelta(0), now=NOW)
    assert result.rows == ()
    assert result.columns == ("category", "listings", "share", "avg_score")
    assert format_table(result).endswith("(0 rows)")


def test_run_query_runs_one_read_only_statement(ch: Any) -> None:
    result = run_query(
        ch, "SELECT category, count() AS n FROM category_tags GROUP BY category ORDER BY category"
    )
    assert result == ReportResult(("category", "n"), (("bags", 3), ("shoes", 2)))
    for sql in (
        "DROP TABLE category_tags",
        "SELECT 1; DROP TABLE category_tags",
        "SELECT 1 INTO OUTFILE '/tmp/x.csv'",
        "INSERT INTO category_tags SELECT * FROM category_tags",
    ):
        with pytest.raises(ValueError, match=r"one statement|read-only"):
            run_query(ch, sql)
    assert ch.query("SELECT count() FROM category_tags").result_rows == [(5,)]


def test_format_table_aligns_columns() -> None:
    result = ReportResult(
        ("day", "label", "n", "rate"),
        ((date(2024, 5, 8), "Color", 12, 0.5), (date(2024, 5, 9), "Brand new", 3, 1 / 3)),
    )
    assert format_table(result) == (
        "day         label       n    rate\n"
        "----------  ---------  --  ------\n"
        "2024-05-08  Color      12     0.5\n"
        "2024-05-09  Brand new   3  0.3333\n"
        "(2 rows)"
    )


def test_to_json_is_valid_json_with_iso_dates() -> None:
    result = ReportResult(
        ("day", "at", "raw", "score", "extra"),
        (
            (
                date(2024, 5, 8),
                datetime(2024, 5, 8, 1, 2, 3, tzinfo=UTC),
                b"\xff\x00",
                float("nan"),
                {"k": 1},
            ),
        ),
    )
    loaded = json.loads(to_json(result))
    assert loaded == {
        "columns": ["day", "at", "raw", "score", "extra"],
        "rows": [
            {
                "day": "2024-05-08",
                "at": "2024-05-08T01:02:03+00:00",
                "raw": "/wA=",
                "score": None,
                "extra": {"k": 1},
            }
        ],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1d", timedelta(days=1)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("7d", timedelta(days=7)),
        (" 2W ", timedelta(weeks=2)),
        ("45s", timedelta(seconds=45)),
    ],
)
def test_parse_since_accepts_a_number_and_a_unit(text: str, expected: timedelta) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "1.5h", "-1d", "3y", "0m", "1d2h", "99999d"])
def test_parse_since_rejects_anything_else_clearly(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid window"):
        parse_since(text)


def test_run_report_rejects_a_negative_window(ch: Any) -> None:
    with pytest.raises(ValueError, match="negative"):
        run_report(ch, "decisions_per_day", timedelta(days=-1))
