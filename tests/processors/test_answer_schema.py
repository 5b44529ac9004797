"""The per-request answer schema: what it admits is a valid, decidable answer; what it
refuses is what free decoding gets wrong (labels, order, types, lengths)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from processors.answer_parsing import parse_answer, validate_answer
from processors.answer_schema import (
    AnswerSchema,
    FieldLimits,
    answer_schema,
)
from processors.decision import decide, unknown_recommendation
from processors.prompt import MAX_QUESTIONS, parse_questions
from processors.records import PickupRequest

QUESTION_SETS: dict[str, list[dict[str, Any]]] = {
    "one boolean": [
        {
            "Type": "boolean",
            "Label": "Is the product damaged?",
            "IsMandatory": True,
            "ValueToCheck": "No",
        },
    ],
    "mixed types": [
        {
            "Type": "boolean",
            "Label": "Brand logo matches",
            "IsMandatory": "true",
            "ValueToCheck": "YES",
        },
        {"Type": "numeric", "Label": "Quantity", "IsMandatory": False, "ValueToCheck": 2},
        {"Type": "text", "Label": "Colour", "IsMandatory": True, "ValueToCheck": "Red"},
        {"Type": "dropdown", "Label": "Category", "IsMandatory": True, "ValueToCheck": "Footwear"},
        {"Label": "Tags intact", "ValueToCheck": True},
        {"Type": "boolean", "Label": "Seal", "ValueToCheck": "none"},
    ],
    "quotes and non-ASCII": [
        {
            "Type": "text",
            "Label": 'Print says "Größe" – étiquette',
            "IsMandatory": True,
            "ValueToCheck": 'He said "ok" \\ back',
        },
        {
            "Type": "text",
            "Label": "颜色 (colour) 🎨",
            "IsMandatory": False,
            "ValueToCheck": "深蓝色 'navy'",
        },
    ],
    "long labels": [
        {
            "Type": "boolean",
            "Label": "Is the " + "very " * 60 + "long label visible?",
            "IsMandatory": True,
            "ValueToCheck": "Yes",
        },
    ],
    "many questions": [
        {
            "Type": ("boolean", "text", "numeric")[i % 3],
            "Label": f"Check number {i}",
            "IsMandatory": i % 2 == 0,
            "ValueToCheck": ("Yes", f"value {i}", str(i))[i % 3],
        }
        for i in range(MAX_QUESTIONS)
    ],
}


def _questions(name: str) -> list[dict[str, Any]]:
    return parse_questions(json.dumps(QUESTION_SETS[name], ensure_ascii=False))


class _Generator:
    """Random instances of a strict answer schema, drawn from the schema itself."""

    ALPHABET = "ab Z09.,;:!?'-_/()é深🎨\"\\\n\t"

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def instance(self, schema: dict[str, Any]) -> Any:
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.random.choice(schema["enum"])
        kind = schema["type"]
        if kind == "object":
            return {k: self.instance(v) for k, v in schema["properties"].items()}
        if kind == "array":
            return [self.instance(item) for item in schema["prefixItems"]]
        if kind == "integer":
            return self.random.randint(schema["minimum"], schema["maximum"])
        if "maxLength" in schema:
            length = self.random.choice((0, 1, schema["maxLength"], self.random.randint(0, 40)))
            length = min(length, schema["maxLength"])
            return "".join(self.random.choice(self.ALPHABET) for _ in range(length))
        sign = self.random.choice(("", "-"))
        decimals = self.random.choice(("", ".5", ".25"))
        return f"{sign}{self.random.randint(0, 10**6 - 1)}{decimals}"


@pytest.mark.parametrize("name", list(QUESTION_SETS))
def test_every_generated_answer_is_valid_parsed_and_decided(name: str) -> None:
    questions = _questions(name)
    strict = answer_schema(questions)
    Draft202012Validator.check_schema(strict.json_schema)
    validator = Draft202012Validator(strict.json_schema)
    generator = _Generator(seed=len(name))
    request = PickupRequest.from_event(
        {
            "shippingid": "s1",
            "uuid": "u1",
            "productid": "p1",
            "productname": "Shoe",
            "question": json.dumps(QUESTION_SETS[name]),
            "pickupproductimage": ["https://example.com/v.jpg"],
            "skupickdone": ["https://example.com/p.jpg"],
        }
    )
    for _ in range(25):
        answer = generator.instance(strict.json_schema)
        assert list(validator.iter_errors(answer)) == []
        assert validate_answer(answer) is None  # the schema of record agrees
        for text in (json.dumps(answer, indent=2, ensure_ascii=False), json.dumps(answer)):
            parsed = parse_answer(text)
            assert parsed.answer == answer, parsed.error
        assert unknown_recommendation(answer) is None
        decision = decide(
            request,
            questions,
            answer,
            model_version="t",
            processing_time_ai=0.0,
            total_time=0.0,
            source=None,
            now=datetime(2026, 1, 1, tzinfo=UTC),
        )
        # Positional answers with the prompt's copied labels are all matched (none missed).
        for got, result in zip(decision.questions, answer["verification_results"], strict=True):
            assert got.evidence == result["Evidence"]


def test_copied_fields_are_the_prompt_text_and_results_follow_the_type() -> None:
    strict = answer_schema(_questions("mixed types")).json_schema
    entries = strict["properties"]["verification_results"]["prefixItems"]
    assert len(entries) == 6
    brand, quantity, colour, category, tags, seal = (e["properties"] for e in entries)
    assert brand["Label"] == {"const": "Brand logo matches"}
    assert brand["IsMandatory"] == {"const": "true"}
    assert brand["Result"]["enum"] == ["YES", "NO"]  # the ValueToCheck's family and case
    assert quantity["ValueToCheck"] == {"const": "2"}
    assert quantity["Result"]["pattern"].startswith("^-?[0-9]")
    assert colour["Result"]["maxLength"] == FieldLimits().text_result
    assert category["Result"]["maxLength"] == FieldLimits().text_result
    assert tags["Result"]["enum"] == ["true", "false"]
    assert seal["Result"]["enum"] == ["Yes", "No", "none"]  # Force Pick stays reachable
    assert entries[0]["properties"]["isRetakeImage"]["enum"] == ["true", "false"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a: a["verification_results"].reverse(),
        lambda a: a["verification_results"].pop(),
        lambda a: a["verification_results"][0].update(Label="brand logo matches"),
        lambda a: a["verification_results"][0].update(Result="maybe"),
        lambda a: a["verification_results"][1].update(Result="two"),
        lambda a: a["verification_results"][1].update(Result="1234567"),
        lambda a: a["verification_results"][1].update(Result="1.234"),
        lambda a: a["verification_results"][2].update(Evidence="x" * 201),
        lambda a: a["verification_results"][2].update(Confidence=101),
        lambda a: a["verification_results"][2].update(Confidence="85"),
        lambda a: a["verification_results"][2].update(isRetakeImage="yes"),
        lambda a: a["pickup_confidence"].update(recommendation="Maybe"),
        lambda a: a["image_analysis"].update(comparison="y" * 301),
        lambda a: a.update(extra=1),
    ],
)
def test_what_free_decoding_gets_wrong_is_refused(mutate: Any) -> None:
    strict = answer_schema(_questions("mixed types"))
    validator = Draft202012Validator(strict.json_schema)
    answer = _Generator(seed=3).instance(strict.json_schema)
    answer["verification_results"][2]["Evidence"] = "fine"
    assert validator.is_valid(answer)
    mutate(answer)
    assert not validator.is_valid(answer)


def test_equal_question_sets_share_one_key_and_differ_otherwise() -> None:
    first = answer_schema(_questions("mixed types"))
    again = answer_schema(_questions("mixed types"))
    other = answer_schema(_questions("one boolean"))
    assert first == again and first.key == again.key
    assert first.key != other.key
    assert hash(first) == hash(again)


def test_max_answer_bytes_bounds_generated_answers() -> None:
    for name in QUESTION_SETS:
        strict: AnswerSchema = answer_schema(_questions(name))
        generator = _Generator(seed=11)
        for _ in range(10):
            answer = generator.instance(strict.json_schema)
            for ascii_only in (False, True):  # escapes are the longest spelling
                text = json.dumps(answer, indent=2, ensure_ascii=ascii_only)
                assert len(text.encode("utf-8")) <= strict.max_answer_bytes
