"""Tests of processors.decision: recommendation mapping and the question rules."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fastavro
import pytest

from processors.decision import (
    LABEL_MATCH_THRESHOLD,
    decide,
    find_most_similar,
    parse_percent,
    values_equal,
)
from processors.errors import ErrorCode, ProcessingError
from processors.records import PickupRequest, SourcePosition, VerificationDecision, input_key
from schemas import avro_schema_json

NOW = datetime(2025, 8, 14, 10, 30, 0, tzinfo=UTC)

REQUEST = PickupRequest.from_event(
    {
        "event_id": "evt-1",
        "occurred_at": 1_755_160_000_000,
        "pickupproductimage": ["https://images.example.com/v/1.jpg"],
        "skupickdone": ["aGVsbG8="],
        "productname": "Navy cotton shirt",
        "question": "[]",
        "shippingid": "SHIP-1",
        "productid": "P-9",
        "uuid": "uuid-1",
    }
)

QUESTIONS: list[dict[str, Any]] = [
    {
        "Type": "boolean",
        "Label": "Is the product damaged?",
        "IsMandatory": True,
        "ValueToCheck": "No",
    },
    {"Type": "text", "Label": "Colour", "IsMandatory": "false", "ValueToCheck": "Navy Blue"},
    {"Type": "number", "Label": "Quantity", "IsMandatory": "true", "ValueToCheck": "2"},
]


def _result(label: str, result: Any, **extra: Any) -> dict[str, Any]:
    item = {
        "Type": "text",
        "Label": label,
        "IsMandatory": "true",
        "ValueToCheck": "",
        "Result": result,
        "Evidence": f"evidence for {label}",
        "Confidence": 80,
        "isRetakeImage": "false",
    }
    item.update(extra)
    return item


def _answer(
    recommendation: str = "Accept", results: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "image_analysis": {
            "pickup_images": "pickup shows a navy shirt",
            "vendor_image": "vendor shows a navy shirt",
            "comparison": "same shirt",
        },
        "verification_results": results
        if results is not None
        else [
            _result("Is the product damaged?", "No"),
            _result("Colour", "Navy Blue"),
            _result("Quantity", "2"),
        ],
        "pickup_confidence": {
            "overall_score": "88.5",
            "confidence_factors": {
                "image_quality": 80,
                "attribute_visibility": 80,
                "matching_confidence": 80,
            },
            "recommendation": recommendation,
        },
    }


def _decide(
    answer: dict[str, Any], questions: list[dict[str, Any]] | None = None, **kwargs: Any
) -> VerificationDecision:
    options: dict[str, Any] = {
        "model_version": "internvl2_5-1b@test",
        "processing_time_ai": 1.25,
        "total_time": 2.5,
        "source": SourcePosition("pickup-completed", 3, 42),
        "now": NOW,
    }
    options.update(kwargs)
    request = options.pop("request", REQUEST)
    return decide(request, QUESTIONS if questions is None else questions, answer, **options)


def _answers(decision: VerificationDecision) -> list[str]:
    return [q.answer for q in decision.questions]


# ------------------------------------------------------------------------------ recommendations


def test_accept_is_pick_and_answers_become_values_to_check() -> None:
    results = [
        _result("Is the product damaged?", "yes"),  # disagrees, but Accept wins
        _result("Colour", "Navy"),
        _result("Quantity", "2"),
    ]
    decision = _decide(_answer("Accept", results))
    assert (decision.ai_decision, decision.final_action, decision.status_code) == (
        "Pick",
        "Pick",
        200,
    )
    assert decision.recommendation == "Accept"
    assert _answers(decision) == ["No", "Navy Blue", "2"]


def test_reject_is_not_pick() -> None:
    results = [
        _result("Is the product damaged?", True),
        _result("Colour", "Black"),
        _result("Quantity", "2.0"),
    ]
    decision = _decide(_answer("Reject", results))
    assert (decision.ai_decision, decision.status_code) == ("Not Pick", 202)
    # Boolean spelled like its ValueToCheck; a differing text answer is blanked; 2.0 == 2.
    assert _answers(decision) == ["Yes", "", "2.0"]


def test_reject_blanks_a_differing_number() -> None:
    results = [
        _result("Is the product damaged?", "No"),
        _result("Colour", "navy blue"),
        _result("Quantity", "1"),
    ]
    decision = _decide(_answer("Reject", results))
    assert decision.ai_decision == "Not Pick"
    assert _answers(decision) == ["No", "navy blue", ""]


def test_partial_is_not_pick() -> None:
    results = [_result("Is the product damaged?", "Yes"), _result("Colour", "Navy Blue")]
    decision = _decide(_answer("Partial", results))
    assert (decision.ai_decision, decision.status_code) == ("Not Pick", 202)
    assert decision.recommendation == "Partial"


def test_retry_is_not_pick_and_keeps_retake_flags() -> None:
    results = [
        _result("Is the product damaged?", "Yes", isRetakeImage=True),
        _result("Colour", "unclear", isRetakeImage="False"),
        _result("Quantity", "2", isRetakeImage="TRUE"),
    ]
    decision = _decide(_answer("Retry", results))
    assert (decision.ai_decision, decision.status_code) == ("Not Pick", 202)
    assert decision.recommendation == "Retry"
    assert [q.is_retake_image for q in decision.questions] == ["true", "false", "true"]


def test_recommendation_case_is_tolerated() -> None:
    assert _decide(_answer("accept")).recommendation == "Accept"


@pytest.mark.parametrize("recommendation", ["Maybe", "", None, 3])
def test_unknown_recommendation(recommendation: Any) -> None:
    answer = _answer()
    answer["pickup_confidence"]["recommendation"] = recommendation
    with pytest.raises(ProcessingError) as caught:
        _decide(answer)
    assert caught.value.code is ErrorCode.UNKNOWN_RECOMMENDATION
    assert caught.value.stage == "decide"


def test_missing_pickup_confidence_is_unknown_recommendation() -> None:
    answer = _answer()
    del answer["pickup_confidence"]
    with pytest.raises(ProcessingError) as caught:
        _decide(answer)
    assert caught.value.code is ErrorCode.UNKNOWN_RECOMMENDATION


# ------------------------------------------------------------------------------ force Pick


def test_force_pick_when_every_answer_is_as_expected() -> None:
    results = [
        _result("is the product damaged", False),  # truth value equals "No"
        _result("COLOUR", "  navy   BLUE "),  # case and spaces ignored
        _result("Quantity", 2.0),  # numeric value
    ]
    decision = _decide(_answer("Reject", results))
    assert (decision.ai_decision, decision.status_code) == ("Pick", 200)
    assert decision.recommendation == "Reject"
    assert _answers(decision) == ["No", "Navy Blue", "2"]


def test_no_force_pick_when_one_value_differs() -> None:
    results = [
        _result("Is the product damaged?", "No"),
        _result("Colour", "Navy Blue"),
        _result("Quantity", "3"),
    ]
    assert _decide(_answer("Reject", results)).ai_decision == "Not Pick"


def test_no_force_pick_when_a_question_is_missed() -> None:
    results = [_result("Is the product damaged?", "No"), _result("Colour", "Navy Blue")]
    assert _decide(_answer("Reject", results)).ai_decision == "Not Pick"


def test_no_force_pick_without_questions() -> None:
    decision = _decide(_answer("Reject", []), questions=[])
    assert decision.ai_decision == "Not Pick"
    assert decision.questions == ()


# ------------------------------------------------------------------------------ label matching


def test_fuzzy_label_just_above_threshold_matches() -> None:
    # token_set_ratio("Color", "Colour") is 90.9
    questions = [{"Type": "text", "Label": "Colour", "ValueToCheck": "Red"}]
    decision = _decide(_answer("Reject", [_result("Color", "Black", Confidence=70)]), questions)
    [answer] = decision.questions
    assert answer.label == "Colour"  # the request's label is kept
    assert answer.evidence == "evidence for Color"
    assert answer.confidence == 70.0


def test_fuzzy_label_just_below_threshold_is_missed() -> None:
    # token_set_ratio("Packaging", "Packing") is 87.5
    questions = [{"Type": "text", "Label": "Packaging", "ValueToCheck": "Original box"}]
    decision = _decide(_answer("Reject", [_result("Packing", "Original box")]), questions)
    [answer] = decision.questions
    assert (answer.answer, answer.evidence, answer.confidence) == ("", "", 0.0)
    assert answer.is_retake_image == "true"


def test_find_most_similar_scores() -> None:
    found = find_most_similar("Colour", ["Size", "Color"])
    assert found is not None
    assert found[0] == 1 and found[1] == pytest.approx(90.909, abs=0.01)
    assert find_most_similar("Packaging", ["Packing"]) is None
    assert find_most_similar("Packaging", ["Packing"], threshold=85) is not None
    assert LABEL_MATCH_THRESHOLD == 90
    assert find_most_similar("Is the product damaged?", ["is the product damaged"]) == (0, 100.0)
    assert find_most_similar("???", ["???"]) is None  # nothing left after processing


def test_exact_label_wins_over_token_subset() -> None:
    # token_set_ratio scores "Color" vs "Color of strap" 100: the exact label must win.
    assert find_most_similar("Color", ["Color of strap", "Color"]) == (1, 100.0)
    questions = [
        {"Type": "text", "Label": "Color", "ValueToCheck": "Red"},
        {"Type": "text", "Label": "Color of strap", "ValueToCheck": "Black"},
    ]
    results = [_result("Color of strap", "Black"), _result("Color", "Red")]
    decision = _decide(_answer("Reject", results), questions)
    assert decision.ai_decision == "Pick"  # both matched the right item, so forced
    assert [q.evidence for q in decision.questions] == [
        "evidence for Color",
        "evidence for Color of strap",
    ]


def test_questions_keep_the_request_order() -> None:
    results = [
        _result("Quantity", "2"),
        _result("Colour", "Black"),
        _result("Is the product damaged?", "No"),
    ]
    decision = _decide(_answer("Reject", results))
    assert [q.label for q in decision.questions] == [q["Label"] for q in QUESTIONS]
    assert _answers(decision) == ["No", "", "2"]


# ------------------------------------------------------------------------------ missed questions


def test_missed_boolean_gets_the_opposite_value() -> None:
    decision = _decide(_answer("Reject", [_result("Colour", "Navy Blue")]))
    damaged, colour, quantity = decision.questions
    assert (damaged.answer, damaged.confidence, damaged.is_retake_image) == ("Yes", 0.0, "true")
    assert colour.answer == "Navy Blue"
    assert (quantity.answer, quantity.confidence, quantity.is_retake_image) == ("", 0.0, "true")


@pytest.mark.parametrize(("value", "opposite"), [("true", "false"), ("Y", "N"), ("1", "0")])
def test_missed_boolean_opposite_keeps_spelling(value: str, opposite: str) -> None:
    questions = [{"Type": "boolean", "Label": "Seal intact", "ValueToCheck": value}]
    [answer] = _decide(_answer("Reject", []), questions).questions
    assert answer.answer == opposite


def test_missed_boolean_without_boolean_value_is_blank() -> None:
    questions = [{"Type": "boolean", "Label": "Seal intact", "ValueToCheck": "Present"}]
    [answer] = _decide(_answer("Reject", []), questions).questions
    assert answer.answer == ""


def test_missed_question_on_pick_takes_value_to_check() -> None:
    decision = _decide(_answer("Accept", [_result("Colour", "Navy Blue")]))
    assert _answers(decision) == ["No", "Navy Blue", "2"]
    assert [q.confidence for q in decision.questions] == [0.0, 80.0, 0.0]


# ------------------------------------------------------------------------------ fields


def test_fields_of_a_question_answer() -> None:
    results = [
        _result("Is the product damaged?", "no", Confidence="85%", isRetakeImage=False),
        _result("Colour", "Navy Blue", Confidence="high"),
        _result("Quantity", "2", Confidence=150),
    ]
    decision = _decide(_answer("Reject", results))
    damaged, colour, quantity = decision.questions
    assert damaged.to_event() == {
        "Type": "boolean",
        "Label": "Is the product damaged?",
        "IsMandatory": "true",
        "ValueToCheck": "No",
        "answer": "No",
        "Evidence": "evidence for Is the product damaged?",
        "Confidence": 85.0,
        "isRetakeImage": "false",
    }
    assert colour.confidence == 0.0  # unreadable
    assert colour.is_mandatory == "false"
    assert quantity.confidence == 100.0  # clamped


def test_is_mandatory_defaults_to_false() -> None:
    questions = [{"Label": "Brand", "ValueToCheck": "Puma"}]
    [answer] = _decide(_answer("Accept", [_result("Brand", "Puma")]), questions).questions
    assert answer.is_mandatory == "false"
    assert answer.type == ""


def test_decision_fields() -> None:
    decision = _decide(
        _answer("Accept"),
        now=datetime(2025, 8, 14, 16, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    )
    assert decision.shippingid == "SHIP-1"
    assert decision.uuid == "uuid-1"
    assert decision.product_id == "P-9"
    assert decision.ai_match_score == 88.5
    assert decision.analysis.test_product_description == "pickup shows a navy shirt"
    assert decision.analysis.reference_product_description == "vendor shows a navy shirt"
    assert decision.analysis.comparison == "same shirt"
    assert decision.status == "success"
    assert decision.timestamp == "2025-08-14T10:30:00+00:00"
    assert decision.processing_time_ai == 1.25
    assert decision.total_time == 2.5
    assert decision.model_version == "internvl2_5-1b@test"
    assert decision.source == SourcePosition("pickup-completed", 3, 42)
    assert decision.idempotency_key == input_key("pickup-completed", {"event_id": "evt-1"})


def test_the_decision_carries_its_request_key() -> None:
    retake = PickupRequest.from_event(
        {**REQUEST.to_event(), "event_id": "", "uuid": "uuid-2", "previousuuid": "uuid-1"}
    )
    decision = _decide(_answer(), request=retake)
    assert decision.idempotency_key == retake.idempotency_key
    assert decision.idempotency_key != _decide(_answer()).idempotency_key


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _decide(_answer(), now=datetime(2025, 1, 1))  # noqa: DTZ001 - the point of the test


def test_decision_event_matches_the_avro_schema() -> None:
    schema = fastavro.parse_schema(copy.deepcopy(avro_schema_json("verification-decision")))
    for recommendation in ("Accept", "Reject", "Partial", "Retry"):
        event = _decide(_answer(recommendation, [_result("Colour", "x")])).to_event()
        assert fastavro.validation.validate(event, schema, raise_errors=True)


# ------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize(
    ("kind", "result", "expected", "equal"),
    [
        ("boolean", True, "Yes", True),
        ("boolean", "n", "No", True),
        ("boolean", "yes", "No", False),
        ("numeric", "2.0", "2", True),
        ("numeric", "2", "3", False),
        ("numeric", "two", "two", True),
        ("text", " Navy  blue", "navy BLUE ", True),
        ("text", "Navy", "Navy Blue", False),
        ("category", "Shoes", "shoes", True),
    ],
)
def test_values_equal(kind: str, result: Any, expected: Any, equal: bool) -> None:
    assert values_equal(kind, result, expected) is equal


@pytest.mark.parametrize(
    ("value", "percent"),
    [
        (85, 85.0),
        ("85%", 85.0),
        (" 72.5 % ", 72.5),
        ("high", 0.0),
        (-5, 0.0),
        (True, 0.0),
        (None, 0.0),
        ("nan", 0.0),
    ],
)
def test_parse_percent(value: Any, percent: float) -> None:
    assert parse_percent(value) == percent
