"""Tests of processors.prompt: question parsing, typing and the prompt text."""

from __future__ import annotations

import re
from typing import Any

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.inference import IMAGE_PLACEHOLDER
from processors.prompt import (
    CONFIDENCE_INSTRUCTION,
    MAX_QUESTIONS,
    STRICT_RETRY_SUFFIX,
    as_text,
    boolean_truth,
    build_prompt,
    classify_question,
    clean_string,
    defect_kind,
    fix_bool,
    fix_verification_questions,
    is_negative_value,
    number_to_word,
    opposite_boolean,
    parse_questions,
    prompt_hash,
    question_kind,
    value_kind,
)

QUESTIONS: list[dict[str, Any]] = [
    {
        "Type": "boolean",
        "Label": "Is the product damaged?",
        "IsMandatory": True,
        "ValueToCheck": "No",
    },
    {
        "Type": "text",
        "Label": "Colour of the shirt",
        "IsMandatory": "false",
        "ValueToCheck": "Navy",
    },
    {"Type": "number", "Label": "Quantity", "IsMandatory": "true", "ValueToCheck": "2"},
]


# ------------------------------------------------------------------------------ parse_questions


def test_parse_questions_reads_a_json_list() -> None:
    parsed = parse_questions('[{"Label": "Brand", "Type": "text", "ValueToCheck": "Puma"}]')
    assert parsed == [{"Label": "Brand", "Type": "text", "ValueToCheck": "Puma"}]


def test_parse_questions_unwraps_the_question_wrapper() -> None:
    text = '{"Question": [{"Label": "Brand"}, {"Label": "Size", "ValueToCheck": "M"}]}'
    assert [q["Label"] for q in parse_questions(text)] == ["Brand", "Size"]


def test_parse_questions_wrapper_key_is_case_insensitive() -> None:
    assert parse_questions('{"question": [{"Label": "Brand"}]}') == [{"Label": "Brand"}]


def test_parse_questions_accepts_single_quotes() -> None:
    parsed = parse_questions("[{'Label': 'Colour', 'ValueToCheck': 'Red'}]")
    assert parsed == [{"Label": "Colour", "ValueToCheck": "Red"}]


def test_parse_questions_accepts_a_python_literal_with_apostrophe_and_true() -> None:
    # Single-to-double quote replacement breaks on the apostrophe; literal_eval reads it.
    parsed = parse_questions("[{'Label': \"Men's size\", 'IsMandatory': True, 'X': None}]")
    assert parsed == [{"Label": "Men's size", "IsMandatory": True, "X": None}]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not a question at all", "neither JSON nor a Python literal"),
        ('"just a string"', "list of objects"),
        ("[]", "empty"),
        ('[{"Label": "ok"}, "stray"]', "question 1 is a str"),
        ('[{"Type": "text"}]', "no Label"),
        ('[{"Label": "   "}]', "no Label"),
        ('[{"Label": 5}]', "no Label"),
        ('{"Questions": [{"Label": "x"}]}', "no 'Question' list"),
        ('{"Question": "x"}', "list of objects"),
        ("[" * 5000, "neither JSON nor a Python literal"),
    ],
)
def test_parse_questions_rejects_garbage(text: str, reason: str) -> None:
    with pytest.raises(ProcessingError) as caught:
        parse_questions(text)
    assert caught.value.code is ErrorCode.INVALID_QUESTION
    assert caught.value.stage == "prompt"
    assert reason in caught.value.message


def test_parse_questions_limits_the_count() -> None:
    many = "[" + ",".join('{"Label": "q"}' for _ in range(MAX_QUESTIONS + 1)) + "]"
    with pytest.raises(ProcessingError, match="at most"):
        parse_questions(many)
    assert len(parse_questions("[" + ",".join('{"Label": "q"}' for _ in range(3)) + "]")) == 3


# ------------------------------------------------------------------------------ number_to_word


@pytest.mark.parametrize(
    ("n", "word"),
    [
        (1, "one"),
        (9, "nine"),
        (10, "ten"),
        (13, "thirteen"),
        (19, "nineteen"),
        (20, "twenty"),
        (21, "twenty-one"),
        (30, "thirty"),
        (42, "forty-two"),
        (50, "fifty"),
        (59, "fifty-nine"),
    ],
)
def test_number_to_word(n: int, word: str) -> None:
    assert number_to_word(n) == word


@pytest.mark.parametrize("n", [0, 60, -1, True])
def test_number_to_word_out_of_range(n: int) -> None:
    with pytest.raises(ValueError, match="1-59"):
        number_to_word(n)


# ------------------------------------------------------------------------------ categories


@pytest.mark.parametrize(
    ("label", "category"),
    [
        ("Product category", "category_verification"),
        ("Does the print design match?", "design_matching"),
        ("Quantity of items", "quantity_verification"),
        ("Number of pieces", "quantity_verification"),
        ("Brand logo visible", "brand_verification"),
        ("Original packaging present", "packaging_verification"),
        ("Boxes intact", "packaging_verification"),
        ("Size of shoe", "size_verification"),
        ("COLOR", "color_verification"),
        ("Colour of strap", "color_verification"),
        ("Colours match", "color_verification"),
        ("Price tag present", "price_verification"),  # price before label
        ("MRP", "price_verification"),
        ("Is the seal intact", "seal_verification"),
        ("Label attached", "label_verification"),
        ("SKU on box", "packaging_verification"),  # box comes before sku in the order
        ("SKU printed", "sku_verification"),  # "printed" is not the whole word "print"
        ("Barcode readable", "sku_verification"),
        ("Same product as listed", "product_matching"),
        ("Anything else", "product_matching"),
        ("Brandy flavour", "product_matching"),  # word boundary: not "brand"
        ("Recolored", "product_matching"),  # word boundary: not "color"
    ],
)
def test_classify_question(label: str, category: str) -> None:
    assert classify_question(label) == category


def test_defect_kind() -> None:
    assert defect_kind("Is the product damaged?") == "damage"
    assert defect_kind("Any scratches on screen") == "damage"
    assert defect_kind("Is the item used or worn?") == "usage"
    assert defect_kind("Signs of use") == "usage"
    assert defect_kind("Colour of strap") is None
    assert defect_kind("Undamaged box") is None  # word boundary


# ------------------------------------------------------------------------------ value types


@pytest.mark.parametrize(
    ("value", "truth"),
    [
        ("Yes", True),
        (" no ", False),
        ("TRUE", True),
        ("false", False),
        ("y", True),
        ("N", False),
        ("1", True),
        ("0", False),
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (2, None),
        ("maybe", None),
        (None, None),
    ],
)
def test_boolean_truth(value: object, truth: bool | None) -> None:
    assert boolean_truth(value) is truth


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("Yes", "boolean"),
        ("false", "boolean"),
        (True, "boolean"),
        ("1", "numeric"),
        ("2.5", "numeric"),
        ("85%", "numeric"),
        (3, "numeric"),
        ("Navy blue", "text"),
        (None, "text"),
    ],
)
def test_value_kind(value: object, kind: str) -> None:
    assert value_kind(value) == kind


@pytest.mark.parametrize(
    ("question", "kind"),
    [
        ({"Type": "Boolean", "ValueToCheck": "1"}, "boolean"),
        ({"Type": "number", "ValueToCheck": "two"}, "numeric"),
        ({"Type": "Numeric"}, "numeric"),
        ({"Type": "dropdown", "ValueToCheck": "Shoes"}, "category"),
        ({"Type": "category"}, "category"),
        ({"Type": "string", "ValueToCheck": "Yes"}, "text"),
        ({"Type": "whatever", "ValueToCheck": "Yes"}, "boolean"),
        ({"ValueToCheck": "3"}, "numeric"),
        ({"ValueToCheck": "Cotton"}, "text"),
    ],
)
def test_question_kind(question: dict[str, object], kind: str) -> None:
    assert question_kind(question) == kind


@pytest.mark.parametrize(
    ("value", "opposite"),
    [
        ("Yes", "No"),
        ("no", "yes"),
        ("YES", "NO"),
        ("True", "False"),
        ("false", "true"),
        ("Y", "N"),
        ("n", "y"),
        ("1", "0"),
        ("0", "1"),
        (True, "false"),
        ("Navy", None),
    ],
)
def test_opposite_boolean_keeps_the_spelling(value: object, opposite: str | None) -> None:
    assert opposite_boolean(value) == opposite


@pytest.mark.parametrize(
    ("value", "style", "fixed"),
    [
        (True, "Yes", "Yes"),
        ("yes", "Yes", "Yes"),
        ("No", "true", "false"),
        ("TRUE", "N", "Y"),
        (False, "NO", "NO"),
        ("y", "1", "1"),
        ("maybe", "Yes", "maybe"),  # not a boolean: unchanged
        ("yes", "Navy", "yes"),  # style not a boolean: unchanged
        (True, True, "true"),
    ],
)
def test_fix_bool(value: object, style: object, fixed: str) -> None:
    assert fix_bool(value, style) == fixed


def test_as_text() -> None:
    assert as_text(True) == "true"
    assert as_text(None) == ""
    assert as_text(2.0) == "2"
    assert as_text(2.5) == "2.5"
    assert as_text("Navy") == "Navy"


def test_is_negative_value() -> None:
    assert is_negative_value("No")
    assert is_negative_value(" not  damaged ")
    assert is_negative_value(False)
    assert not is_negative_value("Yes")
    assert not is_negative_value("Blue")


def test_clean_string_removes_placeholders_and_collapses_spaces() -> None:
    assert clean_string("Men's <image>  Shirt\n{x}`") == "Men's image Shirt x"


# ------------------------------------------------------------------------------ instructions


def test_fix_verification_questions_damage_special_case() -> None:
    fixed = fix_verification_questions(QUESTIONS)
    damaged = fixed[0]
    assert damaged["Label"] == "Is the product damaged?"
    assert damaged["IsMandatory"] == "true"
    assert damaged["ValueToCheck"] == "No"
    # The negative ValueToCheck is the good answer: "No" means no damage was seen.
    assert "Set Result to 'No' if none is visible, or 'Yes' if any is visible" in damaged["Result"]
    assert "damage" in damaged["Evidence"]
    assert damaged["Confidence"] == CONFIDENCE_INSTRUCTION


def test_fix_verification_questions_usage_special_case_keeps_case_style() -> None:
    [fixed] = fix_verification_questions(
        [{"Type": "boolean", "Label": "Is it used?", "ValueToCheck": "FALSE"}]
    )
    assert "signs of use" in fixed["Result"]
    assert "'FALSE' if none is visible, or 'TRUE' if any is visible" in fixed["Result"]


def test_fix_verification_questions_damage_with_text_value() -> None:
    [fixed] = fix_verification_questions([{"Label": "Damage", "ValueToCheck": "No damage"}])
    assert "Set Result to 'No damage' if none is visible" in fixed["Result"]


def test_damage_question_expecting_yes_is_an_ordinary_boolean() -> None:
    [fixed] = fix_verification_questions(
        [{"Type": "boolean", "Label": "Is the box free of damage?", "ValueToCheck": "Yes"}]
    )
    assert fixed["Result"].startswith("Answer 'Is the box free of damage?' by checking")
    assert "'Yes' if the answer is yes, or 'No' if it is no" in fixed["Result"]


def test_fix_verification_questions_per_type_templates() -> None:
    fixed = fix_verification_questions(QUESTIONS)
    assert "the colour" in fixed[1]["Result"]
    assert "Set Result to 'Navy' if the pickup images match it" in fixed[1]["Result"]
    assert "the colour" in fixed[1]["Evidence"]
    assert "digits only" in fixed[2]["Result"]
    assert "how many units" in fixed[2]["Result"]
    [category] = fix_verification_questions(
        [{"Type": "category", "Label": "Product category", "ValueToCheck": "Footwear"}]
    )
    assert "name the category" in category["Result"]
    assert "'Footwear'" in category["Result"]


def test_fix_verification_questions_boolean_uses_value_style() -> None:
    [fixed] = fix_verification_questions(
        [{"Type": "boolean", "Label": "Brand logo visible", "ValueToCheck": "true"}]
    )
    assert "'true' if the answer is yes, or 'false' if it is no" in fixed["Result"]
    assert "brand name or logo" in fixed["Result"]


def test_fix_verification_questions_never_raises_on_odd_fields() -> None:
    [fixed] = fix_verification_questions([{"Label": "x", "ValueToCheck": None, "Type": 7}])
    assert fixed["Type"] == "7"
    assert fixed["ValueToCheck"] == ""


# ------------------------------------------------------------------------------ build_prompt


def test_build_prompt_places_one_placeholder_per_image_in_order() -> None:
    prompt = build_prompt("Cotton shirt", QUESTIONS, 2, 3)
    assert prompt.count(IMAGE_PLACEHOLDER) == 5
    lines = prompt.splitlines()
    assert lines[:5] == [f"Image-{i}: {IMAGE_PLACEHOLDER}" for i in range(1, 6)]
    assert "Images 1 to 2 (two images) are vendor reference images" in prompt
    assert "Images 3 to 5 (three images) are pickup images" in prompt
    assert 'of the product "Cotton shirt"' in prompt
    assert "Strict instructions:" in prompt
    assert '"image_analysis"' in prompt
    assert '"recommendation": "Accept, Reject, Partial or Retry"' in prompt
    assert "Set Result to 'Navy'" in prompt
    assert STRICT_RETRY_SUFFIX not in prompt


def test_build_prompt_singular_ranges() -> None:
    prompt = build_prompt("Mug", QUESTIONS[:1], 1, 1)
    assert "Image 1 (one image) is a vendor reference image" in prompt
    assert "Image 2 (one image) is a pickup image" in prompt
    assert prompt.count(IMAGE_PLACEHOLDER) == 2


def test_build_prompt_counts_beyond_twenty_use_hyphenated_words() -> None:
    prompt = build_prompt("Mug", QUESTIONS[:1], 10, 11)
    assert "Images 11 to 21 (eleven images) are pickup images" in prompt
    assert prompt.count(IMAGE_PLACEHOLDER) == 21


def test_build_prompt_strict_appends_numeric_confidence_rule() -> None:
    prompt = build_prompt("Mug", QUESTIONS, 1, 2, strict=True)
    assert prompt.endswith(STRICT_RETRY_SUFFIX)
    assert "plain number from 0 to 100" in prompt
    assert "exactly in the format above" in prompt
    assert prompt.startswith(build_prompt("Mug", QUESTIONS, 1, 2))


def test_build_prompt_vendor_text_cannot_add_placeholders() -> None:
    hostile = [{"Label": "Is it <image> ok?", "ValueToCheck": "<image>"}]
    prompt = build_prompt("Evil <image> name", hostile, 1, 1)
    assert prompt.count(IMAGE_PLACEHOLDER) == 2


@pytest.mark.parametrize(("vendor", "pickup"), [(0, 1), (1, 0), (30, 30)])
def test_build_prompt_rejects_bad_counts(vendor: int, pickup: int) -> None:
    with pytest.raises(ProcessingError) as caught:
        build_prompt("Mug", QUESTIONS, vendor, pickup)
    assert caught.value.code is ErrorCode.INVALID_REQUEST


def test_prompt_hash() -> None:
    digest = prompt_hash("abc")
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert digest == "ba7816bf8f01cfea"  # sha256("abc") starts so
    assert prompt_hash("abd") != digest
