"""The decision rules: from a validated model answer to Pick / Not Pick (docs/former-service.md).

Recommendation to decision:

=========  ============  ==========
model      ai_decision   StatusCode
=========  ============  ==========
Accept     Pick          200
Reject     Not Pick      202
Partial    Not Pick      202
Retry      Not Pick      202
=========  ============  ==========

- Partial -> Not Pick: the model saw the vendor product but a check failed; a partial
  match must not trigger an automatic refund, so it goes to the manual path.
- Retry -> Not Pick: the photos were not good enough to decide. Every question's
  `isRetakeImage` is kept as the model gave it, so the pickup app can ask the courier for
  new photos of exactly those questions; the raw `recommendation` ("Retry") is in the event.
- Anything else raises `ProcessingError(UNKNOWN_RECOMMENDATION, stage="decide")`.

Question rules, in the request's order:

- Each request label is matched to the model's labels with rapidfuzz
  `fuzz.token_set_ratio` >= `LABEL_MATCH_THRESHOLD` (90), after rapidfuzz's
  `default_process` (lower case, punctuation to spaces, trimmed): "Is the product
  damaged?" and "is the product damaged" score 100. An exact match after processing wins
  over a fuzzy one, because token_set_ratio scores any token subset 100 ("Color" vs
  "Color of strap"); among fuzzy matches the best score wins, ties to the first.
- A request label with no match is a missed question: a boolean question gets the
  opposite of its ValueToCheck (in the same spelling), any other ""; Confidence 0 and
  isRetakeImage "true".
- Force Pick (as the former service): when there is at least one question, every label matched and
  every model Result equals its ValueToCheck, the decision is Pick (200) whatever the
  recommendation. Equality ignores case and repeated spaces; booleans compare by truth
  value ("yes" == "Yes" == true), numbers by value ("2" == "2.0").
- On Pick every answer becomes its ValueToCheck. On Not Pick, a text or numeric question
  whose answer differs from its ValueToCheck gets "" (the refund service reads "" as
  "not confirmed").
- Boolean answers are spelled like their ValueToCheck (true -> "Yes" when it is "No").

Failure behaviour: `decide` raises `ProcessingError(UNKNOWN_RECOMMENDATION)` for an answer
without a known recommendation and `ValueError` for a naive `now`; odd values elsewhere
(unparseable Confidence, missing analysis) degrade to 0 or "" instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from rapidfuzz import fuzz, process
from rapidfuzz.utils import default_process

from processors.errors import ErrorCode, ProcessingError
from processors.prompt import (
    as_text,
    boolean_truth,
    fix_bool,
    opposite_boolean,
    question_kind,
)
from processors.records import (
    Analysis,
    PickupRequest,
    QuestionAnswer,
    SourcePosition,
    VerificationDecision,
)

PICK: Final = "Pick"
NOT_PICK: Final = "Not Pick"
STATUS_PICK: Final = 200
STATUS_NOT_PICK: Final = 202
LABEL_MATCH_THRESHOLD: Final = 90.0

RECOMMENDATION_ACTIONS: Final[Mapping[str, tuple[str, int]]] = {
    "Accept": (PICK, STATUS_PICK),
    "Reject": (NOT_PICK, STATUS_NOT_PICK),
    "Partial": (NOT_PICK, STATUS_NOT_PICK),
    "Retry": (NOT_PICK, STATUS_NOT_PICK),
}


def find_most_similar(
    label: str, candidates: Sequence[str], threshold: float = LABEL_MATCH_THRESHOLD
) -> tuple[int, float] | None:
    """(index, score) of the candidate most similar to `label`, or None below `threshold`.

    The former service's label matching, by index so duplicate labels stay distinct.
    """
    processed = default_process(label)
    for index, candidate in enumerate(candidates):
        if processed and default_process(candidate) == processed:
            return index, 100.0
    best = process.extractOne(
        label,
        candidates,
        scorer=fuzz.token_set_ratio,
        processor=default_process,
        score_cutoff=threshold,
    )
    if best is None:
        return None
    _, score, index = best
    return int(index), float(score)


def _normalized(value: Any) -> str:
    return " ".join(as_text(value).split()).lower()


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip().rstrip("%").strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def values_equal(kind: str, result: Any, expected: Any) -> bool:
    """Whether a model Result equals a ValueToCheck.

    Booleans compare by truth value, numbers by value, anything else as text ignoring
    case and repeated spaces.
    """
    if kind == "boolean":
        truth = boolean_truth(result)
        if truth is not None and truth == boolean_truth(expected):
            return True
    if kind == "numeric":
        left, right = _number(result), _number(expected)
        if left is not None and left == right:
            return True
    return _normalized(result) == _normalized(expected)


def parse_percent(value: Any) -> float:
    """0-100 from a number or numeric string ("85%" -> 85.0), clamped; 0.0 when unreadable."""
    number = _number(value)
    return 0.0 if number is None else min(max(number, 0.0), 100.0)


def _flag(value: Any, default: str = "false") -> str:
    """Return "true"/"false" for boolean spellings, other text lower-cased, `default` if empty."""
    truth = boolean_truth(value)
    if truth is not None:
        return "true" if truth else "false"
    text = as_text(value).strip().lower()
    return text or default


def _recommendation(answer: Mapping[str, Any]) -> str:
    confidence = answer.get("pickup_confidence")
    raw = confidence.get("recommendation") if isinstance(confidence, Mapping) else None
    text = as_text(raw).strip()
    # Case is tolerated; anything else is UNKNOWN_RECOMMENDATION (the schema asks for a string).
    for known in RECOMMENDATION_ACTIONS:
        if text.lower() == known.lower():
            return known
    raise ProcessingError(
        ErrorCode.UNKNOWN_RECOMMENDATION, f"unknown recommendation {raw!r}"[:300], "decide"
    )


def unknown_recommendation(answer: Mapping[str, Any]) -> str | None:
    """Why the answer's recommendation is unusable ("unknown recommendation 'Maybe'"), or None.

    The answer schema only asks for a string, so that a well-formed answer with a
    recommendation outside Accept, Reject, Partial and Retry is told apart (code
    UNKNOWN_RECOMMENDATION) from an answer that is not well-formed (MODEL_OUTPUT_INVALID).
    """
    try:
        _recommendation(answer)
    except ProcessingError as exc:
        return exc.message
    return None


def _analysis(answer: Mapping[str, Any]) -> Analysis:
    raw = answer.get("image_analysis")
    data = raw if isinstance(raw, Mapping) else {}
    return Analysis(
        test_product_description=as_text(data.get("pickup_images")),
        reference_product_description=as_text(data.get("vendor_image")),
        comparison=as_text(data.get("comparison")),
    )


def _answer_for(
    question: Mapping[str, Any], result: Mapping[str, Any] | None, decision: str
) -> QuestionAnswer:
    kind = question_kind(question)
    expected = as_text(question.get("ValueToCheck"))
    if result is None:
        answer = (opposite_boolean(expected) or "") if kind == "boolean" else ""
        evidence, confidence, retake = "", 0.0, "true"
    else:
        raw = result.get("Result")
        answer = fix_bool(raw, expected) if kind == "boolean" else as_text(raw).strip()
        evidence = as_text(result.get("Evidence"))
        confidence = parse_percent(result.get("Confidence"))
        retake = _flag(result.get("isRetakeImage"))
    if decision == PICK:
        answer = expected
    elif kind in ("text", "numeric") and not values_equal(kind, answer, expected):
        answer = ""
    return QuestionAnswer(
        type=as_text(question.get("Type")),
        label=as_text(question.get("Label")),
        is_mandatory=_flag(question.get("IsMandatory")),
        value_to_check=expected,
        answer=answer,
        evidence=evidence,
        confidence=confidence,
        is_retake_image=retake,
    )


def decide(
    request: PickupRequest,
    questions: Sequence[Mapping[str, Any]],
    answer: Mapping[str, Any],
    *,
    model_version: str,
    processing_time_ai: float,
    total_time: float,
    source: SourcePosition | None,
    now: datetime,
) -> VerificationDecision:
    """The decision for one request from its parsed questions and validated answer.

    See the module docstring for the rules. `now` must be timezone-aware; the timestamp is
    its ISO-8601 form in UTC. The idempotency key is the request's own
    (`processors.records.input_key`), so a redelivered event yields the same key.

    Raises `ProcessingError(UNKNOWN_RECOMMENDATION, stage="decide")` and `ValueError` (naive
    `now`).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    recommendation = _recommendation(answer)
    decision, status_code = RECOMMENDATION_ACTIONS[recommendation]

    raw_results = answer.get("verification_results")
    results = [r for r in raw_results or () if isinstance(r, Mapping)]
    response_labels = [as_text(r.get("Label")) for r in results]
    matched: list[Mapping[str, Any] | None] = []
    for question in questions:
        found = find_most_similar(as_text(question.get("Label")), response_labels)
        matched.append(results[found[0]] if found is not None else None)

    all_as_expected = bool(questions) and all(
        result is not None
        and values_equal(question_kind(q), result.get("Result"), q.get("ValueToCheck"))
        for q, result in zip(questions, matched, strict=True)
    )
    if all_as_expected:
        decision, status_code = PICK, STATUS_PICK

    pickup_confidence = answer.get("pickup_confidence")
    overall = (
        pickup_confidence.get("overall_score") if isinstance(pickup_confidence, Mapping) else None
    )
    return VerificationDecision(
        shippingid=request.shippingid,
        uuid=request.uuid,
        product_id=request.productid,
        questions=tuple(
            _answer_for(q, result, decision) for q, result in zip(questions, matched, strict=True)
        ),
        ai_decision=decision,
        final_action=decision,
        ai_match_score=parse_percent(overall),
        analysis=_analysis(answer),
        status="success",
        status_code=status_code,
        processing_time_ai=processing_time_ai,
        total_time=total_time,
        timestamp=now.astimezone(UTC).isoformat(),
        model_version=model_version,
        recommendation=recommendation,
        idempotency_key=request.idempotency_key,
        source=source,
    )
