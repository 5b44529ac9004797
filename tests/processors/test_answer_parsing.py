"""Tests of processors.answer_parsing with the kinds of text a small VLM really emits."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from processors.answer_parsing import (
    MAX_ERROR_CHARS,
    NO_JSON_ERROR,
    ParsedAnswer,
    _validator,
    extract_json,
    extract_json_regex_fields,
    parse_answer,
    repair_json,
    validate_answer,
)

ANSWER: dict[str, Any] = {
    "image_analysis": {
        "pickup_images": "A navy cotton shirt, folded, tags attached.",
        "vendor_image": "A navy cotton shirt on a model.",
        "comparison": "Same colour, print and collar.",
    },
    "verification_results": [
        {
            "Type": "boolean",
            "Label": "Is the product damaged?",
            "IsMandatory": "true",
            "ValueToCheck": "No",
            "Result": "No",
            "Evidence": "No tears or stains in images 3 and 4.",
            "Confidence": 92,
            "isRetakeImage": "false",
        }
    ],
    "pickup_confidence": {
        "overall_score": 90,
        "confidence_factors": {
            "image_quality": 85,
            "attribute_visibility": 88,
            "matching_confidence": 91,
        },
        "recommendation": "Accept",
    },
}
CLEAN = json.dumps(ANSWER, indent=2)

PYTHONISH = """{
  'image_analysis': {
    'pickup_images': "A navy shirt, the customer's tag still on",
    'vendor_image': 'A navy shirt',
    'comparison': 'Same shirt',
  },
  'verification_results': [
    {'Type': 'boolean', 'Label': 'Is the product damaged?', 'IsMandatory': True,
     'ValueToCheck': 'No', 'Result': False, 'Evidence': 'None seen', 'Confidence': 85%,
     'isRetakeImage': False,},
  ],
  'pickup_confidence': {'overall_score': 80, 'confidence_factors': {'image_quality': 70,
    'attribute_visibility': 75, 'matching_confidence': 80,}, 'recommendation': 'Accept'},
}"""

YAML_ANSWER = """image_analysis:
  pickup_images: A navy shirt
  vendor_image: A navy shirt
  comparison: Same
verification_results:
  - Type: boolean
    Label: Is the product damaged?
    IsMandatory: "true"
    ValueToCheck: "No"
    Result: "No"
    Evidence: Nothing visible
    Confidence: 80
    isRetakeImage: "false"
pickup_confidence:
  overall_score: 75
  confidence_factors:
    image_quality: 70
    attribute_visibility: 72
    matching_confidence: 78
  recommendation: Reject
"""


def _with(**changes: Any) -> dict[str, Any]:
    answer = copy.deepcopy(ANSWER)
    for dotted, value in changes.items():
        target: Any = answer
        *path, last = dotted.split("__")
        for part in path:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    return answer


# ------------------------------------------------------------------------------ extraction


def test_clean_json() -> None:
    parsed = parse_answer(CLEAN)
    assert parsed == ParsedAnswer(ANSWER, "")
    assert parsed.ok


def test_fenced_json_with_prose_around() -> None:
    text = f"Sure! Here is my analysis.\n```json\n{CLEAN}\n```\nLet me know if you need more."
    assert parse_answer(text).answer == ANSWER


def test_unterminated_fence() -> None:
    assert parse_answer(f"```json\n{CLEAN}").answer == ANSWER


def test_prose_without_fence() -> None:
    text = f"The pickup matches. Result: {json.dumps(ANSWER)} That is all."
    assert parse_answer(text).answer == ANSWER


def test_prose_with_colon_before_json_is_not_taken_for_yaml() -> None:
    # YAML reads this as {"Final answer": {...}}; the answer inside must still be found.
    text = f"Final answer: {json.dumps(ANSWER)}"
    assert extract_json(text) == ANSWER


def test_single_quotes_python_literals_trailing_commas_and_bare_percent() -> None:
    parsed = parse_answer(PYTHONISH)
    assert parsed.ok, parsed.error
    assert parsed.answer is not None
    item = parsed.answer["verification_results"][0]
    assert item["Result"] is False
    assert item["IsMandatory"] is True
    assert item["Confidence"] == "85%"
    assert parsed.answer["image_analysis"]["pickup_images"].endswith("customer's tag still on")


def test_yaml_answer() -> None:
    parsed = parse_answer(YAML_ANSWER)
    assert parsed.ok, parsed.error
    assert parsed.answer is not None
    assert parsed.answer["pickup_confidence"]["recommendation"] == "Reject"


def test_raw_newline_inside_a_string() -> None:
    text = CLEAN.replace("Same colour, print and collar.", "Same colour,\nsame collar.")
    parsed = parse_answer(text)
    assert parsed.ok
    assert parsed.answer is not None
    assert parsed.answer["image_analysis"]["comparison"] == "Same colour,\nsame collar."


def test_example_object_before_the_real_answer() -> None:
    example = '{"image_analysis": "..."}'
    parsed = parse_answer(f"Format: ```json\n{example}\n```\nAnswer: ```json\n{CLEAN}\n```")
    assert parsed.answer == ANSWER


def test_broken_glue_falls_back_to_per_field_regex() -> None:
    # Missing commas between the top-level fields: no parser reads the whole object.
    text = (
        '{"image_analysis": ' + json.dumps(ANSWER["image_analysis"]) + "\n"
        '"verification_results": ' + json.dumps(ANSWER["verification_results"]) + "\n"
        '"pickup_confidence": ' + json.dumps(ANSWER["pickup_confidence"]) + "}"
    )
    assert json_fails(text)
    assert parse_answer(text).answer == ANSWER


def json_fails(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def test_regex_fields_skip_cut_off_values() -> None:
    text = '"image_analysis": {"pickup_images": "a", "vendor_image": "b", "comparison": "c"}, '
    text += '"verification_results": [{"Type": "boolean", "Label": "x"'
    assert extract_json_regex_fields(text) == {
        "image_analysis": {"pickup_images": "a", "vendor_image": "b", "comparison": "c"}
    }
    assert extract_json_regex_fields("no fields here") is None


def test_truncated_json_fails_validation() -> None:
    truncated = CLEAN[: CLEAN.index('"pickup_confidence"') + 40]
    parsed = parse_answer(truncated)
    assert not parsed.ok
    assert parsed.answer is None
    assert "'pickup_confidence' is a required property" in parsed.error


def test_truncated_inside_results_fails() -> None:
    truncated = CLEAN[: CLEAN.index('"Evidence"')]
    parsed = parse_answer(truncated)
    assert parsed.answer is None
    assert "required property" in parsed.error


@pytest.mark.parametrize(
    "text", ["", "I cannot see the images.", "[1, 2, 3]", "```\nno json here\n```", "{{{{"]
)
def test_no_json_object(text: str) -> None:
    assert parse_answer(text) == ParsedAnswer(None, NO_JSON_ERROR)
    assert extract_json(text) is None


def test_extract_json_returns_a_non_answer_dict_when_nothing_better() -> None:
    assert extract_json('{"foo": 1}') == {"foo": 1}
    assert parse_answer('{"foo": 1}').error.startswith("(root): 'image_analysis' is a required")


# ------------------------------------------------------------------------------ repair


@pytest.mark.parametrize(
    ("text", "repaired"),
    [
        ("{'a': 'b'}", '{"a": "b"}'),
        ("{'a': 'the customer's bag'}", '{"a": "the customer\'s bag"}'),
        ("{'a': 'say \"hi\"'}", '{"a": "say \\"hi\\""}'),
        ('{"a": [1, 2,], }', '{"a": [1, 2] }'),
        ('{"a": True, "b": None, "c": False}', '{"a": true, "b": null, "c": false}'),
        ('{"a": "True stays inside strings"}', '{"a": "True stays inside strings"}'),
        ('{"c": 85%, "d": -3.5 %}', '{"c": "85%", "d": "-3.5 %"}'),
        ('{"c": "85%"}', '{"c": "85%"}'),
    ],
)
def test_repair_json(text: str, repaired: str) -> None:
    assert repair_json(text) == repaired


# ------------------------------------------------------------------------------ validation


def test_validate_answer_accepts_numeric_strings_and_percent() -> None:
    answer = _with(
        verification_results__0__Confidence="85%",
        pickup_confidence__overall_score="90.5",
        verification_results__0__isRetakeImage=False,
        verification_results__0__IsMandatory=True,
    )
    assert validate_answer(answer) is None


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"pickup_confidence__recommendation": 3}, "pickup_confidence/recommendation"),
        ({"verification_results__0__Confidence": 150}, "verification_results/0/Confidence"),
        ({"verification_results__0__Confidence": "high"}, "verification_results/0/Confidence"),
        ({"pickup_confidence__overall_score": "very high"}, "pickup_confidence/overall_score"),
        ({"image_analysis__comparison": 3}, "image_analysis/comparison"),
        ({"verification_results": {"Label": "x"}}, "verification_results"),
    ],
)
def test_validate_answer_reports_the_path(changes: dict[str, Any], fragment: str) -> None:
    error = validate_answer(_with(**changes))
    assert error is not None
    assert error.startswith(fragment)


def test_validate_answer_missing_result_field() -> None:
    answer = copy.deepcopy(ANSWER)
    del answer["verification_results"][0]["Result"]
    assert validate_answer(answer) == "verification_results/0: 'Result' is a required property"


def test_validate_answer_non_dict() -> None:
    assert validate_answer([1]) == "(root): [1] is not of type 'object'"


def test_validation_error_is_truncated() -> None:
    answer = _with(image_analysis__comparison=["x" * 5000])
    error = validate_answer(answer)
    assert error is not None
    assert len(error) == MAX_ERROR_CHARS


def test_validator_is_compiled_once() -> None:
    assert _validator() is _validator()


def test_parse_answer_reports_the_first_answer_like_error() -> None:
    bad = json.dumps(_with(pickup_confidence__recommendation=["Accept"]))
    parsed = parse_answer(f"```json\n{bad}\n```")
    assert parsed.answer is None
    assert parsed.error.startswith("pickup_confidence/recommendation: ['Accept'] is not of type")
