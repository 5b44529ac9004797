"""The accuracy reports over the reviews tables, on embedded chDB with a known set of verdicts."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from processors.analytics.reports import list_reports, run_report
from processors.analytics.sink import AnalyticsSink
from tests.processors.review.conftest import T0, new_sink, rec, verdict

NOW = datetime.fromtimestamp(T0 / 1000, UTC) + timedelta(days=2)
EVER = timedelta(days=3650)
DAY = 86_400_000


def load(sink: AnalyticsSink) -> None:
    """Four reviewed decisions over two days; k1 is re-reviewed (the later verdict counts)."""
    pick, no = "Pick", "Not Pick"
    events = [
        # k1: first judged wrong, then (a day later) right: only the later verdict counts.
        verdict("k1", review_id="01" * 16, ai=pick, reviewer_decision=no, marks=((0, False),)),
        verdict(
            "k1", review_id="02" * 16, ai=pick, reviewer_decision=pick, at_ms=T0 + DAY,
            marks=((0, True), (1, True)),
        ),
        verdict("k2", review_id="03" * 16, reviewer_decision=no, marks=((0, False), (1, True))),
        verdict(
            "k3", review_id="04" * 16, ai=no, reviewer_decision=no, product_id="P2",
            model_version="internvl-2", marks=((1, False),),
        ),
        verdict(
            "k4", review_id="05" * 16, ai=no, reviewer_decision=no, product_id="P2",
            at_ms=T0 + DAY, marks=(),
        ),
    ]  # fmt: skip
    for offset, event in enumerate([*events, events[2]]):  # k2 redelivered
        sink.add(rec("verification-review", offset, event))
    sink.flush()


def rows(ch: Any, name: str, since: timedelta = EVER) -> list[dict[str, Any]]:
    return run_report(ch, name, since, now=NOW).as_dicts()


def test_the_review_reports_are_listed() -> None:
    assert {
        "review_agreement",
        "review_agreement_per_day",
        "review_confusion_matrix",
        "review_answer_accuracy",
        "review_agreement_by_product",
        "review_agreement_by_model",
    } <= set(list_reports())


def test_agreement_counts_each_decision_once_by_its_latest_verdict(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    load(new_sink(sinks, dsn))
    (overall,) = rows(ch, "review_agreement")
    assert (overall["reviewed"], overall["agreed"], overall["disagreed"]) == (4, 3, 1)
    assert overall["agreement_rate"] == 0.75 and overall["small_sample"]
    assert 0.3 < overall["agreement_low"] < 0.75 < overall["agreement_high"] < 1.0
    per_day = [
        (r["day"].isoformat(), r["reviewed"], r["agreed"])
        for r in rows(ch, "review_agreement_per_day")
    ]
    assert per_day == [("2024-05-01", 2, 1), ("2024-05-02", 2, 2)]
    # The window: only verdicts of the last day (NOW is May 3rd 10:00).
    (recent,) = rows(ch, "review_agreement", timedelta(days=1, hours=1))
    assert (recent["reviewed"], recent["agreed"]) == (2, 2)


def test_confusion_matrix(ch: Any, dsn: str, sinks: list[AnalyticsSink]) -> None:
    load(new_sink(sinks, dsn))
    matrix = {
        (r["ai_decision"], r["reviewer_decision"]): r["reviews"]
        for r in rows(ch, "review_confusion_matrix")
    }
    assert matrix == {("Pick", "Pick"): 1, ("Pick", "Not Pick"): 1, ("Not Pick", "Not Pick"): 2}


def test_answer_accuracy_uses_the_latest_verdicts_marks(
    ch: Any, dsn: str, sinks: list[AnalyticsSink]
) -> None:
    load(new_sink(sinks, dsn))
    got = {(r["label"], r["marked"], r["correct"]) for r in rows(ch, "review_answer_accuracy")}
    # Color: k1 (latest: correct) + k2 (wrong); Brand: k1 correct, k2 correct, k3 wrong.
    assert got == {("Color", 2, 1), ("Brand", 3, 2)}


def test_agreement_by_product_and_by_model(ch: Any, dsn: str, sinks: list[AnalyticsSink]) -> None:
    load(new_sink(sinks, dsn))
    by_product = {
        r["product_id"]: (r["reviewed"], r["agreed"], r["answers_marked"], r["answers_wrong"])
        for r in rows(ch, "review_agreement_by_product")
    }
    assert by_product == {"P1": (2, 1, 4, 1), "P2": (2, 2, 1, 1)}
    by_model = {r["model_version"]: r for r in rows(ch, "review_agreement_by_model")}
    assert by_model["internvl-1"]["reviewed"] == 3 and by_model["internvl-2"]["reviewed"] == 1
    assert by_model["internvl-2"]["answer_accuracy"] == 0.0
    p2 = next(r for r in rows(ch, "review_agreement_by_product") if r["product_id"] == "P2")
    assert not math.isnan(p2["answer_accuracy"])


def test_no_reviews_yet(ch: Any) -> None:
    (overall,) = rows(ch, "review_agreement")
    assert overall["reviewed"] == 0 and math.isnan(overall["agreement_rate"])
    assert rows(ch, "review_confusion_matrix") == []
