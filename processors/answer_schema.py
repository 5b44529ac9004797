"""The per-request answer schema: the JSON Schema one request's answer must meet exactly.

`schemas/json/model_answer.schema.json` is the validator of record for every engine; it is
lenient, because free decoding gets types and labels wrong. When the decoder is
constrained (`processors.constrained`), the structure of the answer is known before the
model writes a token, so this module builds, from the request's parsed questions, a much
stricter schema that the decoder cannot leave:

- `image_analysis`: its three strings, each bounded in length;
- `verification_results`: exactly the request's questions, in order, with `Type`,
  `Label`, `IsMandatory` and `ValueToCheck` constant (the cleaned text the prompt shows,
  `processors.prompt.fix_verification_questions`); `Result` by the question's type:
  boolean -> one of the two spellings the prompt asks for (the ValueToCheck's own family
  and case, as `processors.decision` reads them; a non-boolean ValueToCheck is allowed
  too, so Force Pick stays reachable), numeric -> a numeric string, text and category ->
  a bounded string; `Evidence` bounded; `Confidence` an integer 0-100; `isRetakeImage`
  "true" or "false";
- `pickup_confidence`: integer scores 0-100 and a recommendation among the four that
  `processors.decision` maps.

Free strings are bounded in characters (`maxLength`), so every answer is bounded:
`AnswerSchema.max_answer_bytes` is its worst case in UTF-8 bytes (a free character written
as a surrogate-pair escape takes 12), which bounds the tokens of any tokenization (every
token is at least one byte), so a decoder that cannot leave the grammar always stops.

Everything this schema admits validates against the schema of record and is read by
`processors.answer_parsing.parse_answer` (tests/processors/test_answer_schema.py checks
both on generated answers). Total: never raises for any list of question dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

from processors.decision import RECOMMENDATION_ACTIONS
from processors.prompt import (
    _render_bool,
    as_text,
    boolean_truth,
    clean_string,
    question_kind,
)

RECOMMENDATIONS: Final = tuple(RECOMMENDATION_ACTIONS)
RETAKE_VALUES: Final = ("true", "false")
ANALYSIS_KEYS: Final = ("pickup_images", "vendor_image", "comparison")
FACTOR_KEYS: Final = ("image_quality", "attribute_visibility", "matching_confidence")
#: The fields copied from the request, in the prompt's order.
COPIED_KEYS: Final = ("Type", "Label", "IsMandatory", "ValueToCheck")
#: A numeric Result: up to 6 digits, an optional sign and up to 2 decimals (what
#: `decision._number` reads). Spelled without counted repetition: xgrammar 0.2.9 does not
#: keep the upper bound of `{1,9}` (tests/processors/test_constrained.py caught 12 digits).
NUMERIC_PATTERN: Final = r"^-?[0-9][0-9]?[0-9]?[0-9]?[0-9]?[0-9]?(\.[0-9][0-9]?)?$"
NUMERIC_MAX_CHARS: Final = 10
#: Bytes of one free character, at most: a surrogate-pair escape ("\\ud83c\\udfa8").
MAX_CHAR_BYTES: Final = 12
#: Bytes the layout adds around the fixed parts (indentation, newlines), per value, at most.
_LAYOUT_BYTES_PER_VALUE: Final = 24


@dataclass(frozen=True, slots=True)
class FieldLimits:
    """Maximum characters of each free string of the answer."""

    analysis: int = 300
    evidence: int = 200
    text_result: int = 80

    def __post_init__(self) -> None:
        for name in ("analysis", "evidence", "text_result"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _free_string(limit: int) -> dict[str, Any]:
    # maxLength alone, no pattern: a bounded-repetition pattern costs xgrammar a mask
    # computed at run time per step (bench/bench_grammar_mask.py measured 1.5 s at batch 64).
    return {"type": "string", "maxLength": limit}


def _percent() -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": 100}


@dataclass(frozen=True, slots=True)
class QuestionShape:
    """What one question's answer entry must be: its copied fields and its Result rule."""

    copied: tuple[tuple[str, str], ...]  # (key, constant text), in COPIED_KEYS order
    kind: str
    choices: tuple[str, ...]  # boolean answers allowed; empty for the other kinds

    @property
    def key(self) -> tuple[Any, ...]:
        """The shape as one hashable value: equal for questions with the same answer rule."""
        return (self.copied, self.kind, self.choices)


def question_shape(question: Mapping[str, Any]) -> QuestionShape:
    """The answer rule of one parsed question (as `fix_verification_questions` shows it)."""
    value = clean_string(as_text(question.get("ValueToCheck")))
    copied = (
        ("Type", clean_string(as_text(question.get("Type")))),
        ("Label", clean_string(as_text(question.get("Label")))),
        ("IsMandatory", clean_string(as_text(question.get("IsMandatory")))),
        ("ValueToCheck", value),
    )
    kind = question_kind(question)
    choices: tuple[str, ...] = ()
    if kind == "boolean":
        style = value if boolean_truth(value) is not None else "Yes"
        yes, no = _render_bool(True, style), _render_bool(False, style)
        extra = (value,) if value and boolean_truth(value) is None else ()
        choices = (yes, no, *extra)
    return QuestionShape(copied, kind, choices)


@dataclass(frozen=True)
class AnswerSchema:
    """The strict schema of one question set; equal question sets give equal objects.

    `key` (a SHA-256 of the canonical schema) names the compiled grammar in caches.
    """

    shapes: tuple[QuestionShape, ...]
    limits: FieldLimits = FieldLimits()

    @cached_property
    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema (draft 2020-12) of the answer, properties in answer order."""
        return _build_schema(self.shapes, self.limits)

    @cached_property
    def text(self) -> str:
        """The schema as canonical JSON text (what the grammar compilers take)."""
        return json.dumps(self.json_schema, ensure_ascii=False, separators=(",", ":"))

    @cached_property
    def key(self) -> str:
        """SHA-256 of the schema's text: the cache key of its compiled grammar."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def max_answer_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of any answer the schema admits.

        It holds for any layout of at most `_LAYOUT_BYTES_PER_VALUE` whitespace bytes
        per value.
        """
        return _fixed_bytes(self.shapes) + MAX_CHAR_BYTES * _free_chars(self.shapes, self.limits)


def answer_schema(
    questions: Sequence[Mapping[str, Any]], limits: FieldLimits | None = None
) -> AnswerSchema:
    """The strict answer schema of a request's parsed questions (`parse_questions`)."""
    return AnswerSchema(tuple(question_shape(q) for q in questions), limits or FieldLimits())


def _result_schema(shape: QuestionShape, limits: FieldLimits) -> dict[str, Any]:
    if shape.kind == "boolean":
        return {"type": "string", "enum": list(dict.fromkeys(shape.choices))}
    if shape.kind == "numeric":
        return {"type": "string", "pattern": NUMERIC_PATTERN}  # at most NUMERIC_MAX_CHARS
    return _free_string(limits.text_result)


def _entry_schema(shape: QuestionShape, limits: FieldLimits) -> dict[str, Any]:
    properties: dict[str, Any] = {key: {"const": text} for key, text in shape.copied}
    properties["Result"] = _result_schema(shape, limits)
    properties["Evidence"] = _free_string(limits.evidence)
    properties["Confidence"] = _percent()
    properties["isRetakeImage"] = {"type": "string", "enum": list(RETAKE_VALUES)}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _build_schema(shapes: Sequence[QuestionShape], limits: FieldLimits) -> dict[str, Any]:
    entries = [_entry_schema(shape, limits) for shape in shapes]
    schema = _object(
        {
            "image_analysis": _object({k: _free_string(limits.analysis) for k in ANALYSIS_KEYS}),
            "verification_results": {
                "type": "array",
                "prefixItems": entries,
                "items": False,
                "minItems": len(entries),
                "maxItems": len(entries),
            },
            "pickup_confidence": _object(
                {
                    "overall_score": _percent(),
                    "confidence_factors": _object({k: _percent() for k in FACTOR_KEYS}),
                    "recommendation": {"type": "string", "enum": list(RECOMMENDATIONS)},
                }
            ),
        }
    )
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode("utf-8"))


def _fixed_bytes(shapes: Sequence[QuestionShape]) -> int:
    """Bytes of everything but the free strings.

    That is keys, punctuation, constants, enums, numbers (3 digits), the quotes around
    free strings, and layout whitespace.
    """
    values = 0
    total = _json_bytes(list(ANALYSIS_KEYS) + list(FACTOR_KEYS)) + _json_bytes(
        ["image_analysis", "verification_results", "pickup_confidence"]
    )
    total += _json_bytes(["overall_score", "confidence_factors", "recommendation"])
    total += max(_json_bytes(r) for r in RECOMMENDATIONS) + 3 * 4  # the four scores
    values += 3 + 3 + 4 + 4  # analysis strings, objects/array, scores, recommendation
    for shape in shapes:
        total += _json_bytes([k for k, _ in shape.copied])
        total += _json_bytes([t for _, t in shape.copied])
        total += _json_bytes(["Result", "Evidence", "Confidence", "isRetakeImage"])
        if shape.kind == "boolean":
            total += max(_json_bytes(c) for c in shape.choices)
        elif shape.kind == "numeric":
            total += NUMERIC_MAX_CHARS + 2
        else:
            total += 2
        total += 2 + 3 + _json_bytes("false")  # Evidence quotes, Confidence, isRetakeImage
        values += 9
    return total + _LAYOUT_BYTES_PER_VALUE * values


def _free_chars(shapes: Sequence[QuestionShape], limits: FieldLimits) -> int:
    text_results = sum(1 for s in shapes if s.kind in ("text", "category"))
    return (
        len(ANALYSIS_KEYS) * limits.analysis
        + len(shapes) * limits.evidence
        + text_results * limits.text_result
    )
