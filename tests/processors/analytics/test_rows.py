"""What each record becomes: routing by contract, so renamed topics keep their tables."""

from __future__ import annotations

from processors.analytics.rows import SinkRecord, rows_for
from processors.contracts import Topics
from processors.errors import Failure
from tests.processors.analytics.test_sink import T0, decision


def test_topics_are_configurable() -> None:
    topics = Topics(verification_decision="prod.decisions")
    routed = rows_for(SinkRecord("prod.decisions", 0, 0, decision("k"), T0), topics)
    assert isinstance(routed, dict) and set(routed) == {
        "verification_decisions",
        "question_answers",
    }
    assert isinstance(
        rows_for(SinkRecord("verification-decision", 0, 0, decision("k"), T0), topics), Failure
    )
    assert Topics().all() == (
        "pickup-completed", "product-listed", "verification-decision", "category-tag",
        "verification-attempts", "dead-letter", "verification-review", "review-image",
    )  # fmt: skip
