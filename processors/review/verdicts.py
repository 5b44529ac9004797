"""The `verification-review` event a reviewer's verdict becomes.

`Verdict.to_event()` has the fields of `schemas/avro/verification-review/v1.avsc`.
`verdict_from_form` reads the review page's form against the decision it was shown
for and raises `ValueError` (with a message fit for the reviewer) for a form that
does not match it; it never trusts the form for the decision's own fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

DECISIONS = ("Pick", "Not Pick")
MAX_NOTE = 2000


@dataclass(frozen=True, slots=True)
class AnswerMark:
    """The reviewer's mark on one answer: correct or wrong."""

    question_index: int
    type: str
    label: str
    correct: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    """One reviewer's verdict on one decision (`review_id` is its idempotency key)."""

    review_id: str
    decision_key: str
    request_uuid: str
    shippingid: str
    product_id: str
    model_version: str
    ai_decision: str
    reviewer_decision: str
    answers: tuple[AnswerMark, ...]
    note: str
    reviewer: str
    reviewed_at: datetime

    @property
    def agrees(self) -> bool:
        """Whether the reviewer's decision is the model's."""
        return self.ai_decision == self.reviewer_decision

    def to_event(self) -> dict[str, Any]:
        """The verdict as a `verification-review` event."""
        return {
            "review_id": self.review_id,
            "decision_key": self.decision_key,
            "request_uuid": self.request_uuid,
            "shippingid": self.shippingid,
            "product_id": self.product_id,
            "model_version": self.model_version,
            "ai_decision": self.ai_decision,
            "reviewer_decision": self.reviewer_decision,
            "agrees": self.agrees,
            "answers": [
                {
                    "question_index": a.question_index,
                    "type": a.type,
                    "label": a.label,
                    "correct": a.correct,
                }
                for a in self.answers
            ],
            "note": self.note,
            "reviewer": self.reviewer,
            "reviewed_at": int(self.reviewed_at.timestamp() * 1000),
        }


def verdict_from_form(
    form: Mapping[str, str],
    decision: Mapping[str, Any],
    questions: Sequence[Mapping[str, Any]],
    *,
    reviewer: str,
    now: datetime,
) -> Verdict:
    """Build the verdict from the posted form and the stored decision it was shown for.

    Form fields: `review_id` (hex, from the page), `verdict` (`agree` or `override`),
    `answer_<index>` (`correct`, `wrong` or empty), `note`. An override flips the
    model's decision. `decision` needs idempotency_key, uuid, shippingid, product_id,
    model_version, ai_decision; `questions` needs question_index, type, label.
    Raises `ValueError` for a missing or malformed field.
    """
    review_id = form.get("review_id", "")
    if not (8 <= len(review_id) <= 64 and all(c in "0123456789abcdef" for c in review_id)):
        raise ValueError("the form has no valid review id; reload the page")
    ai = str(decision["ai_decision"])
    if ai not in DECISIONS:
        raise ValueError(f"the stored decision {ai!r} is not Pick or Not Pick")
    choice = form.get("verdict", "")
    if choice == "agree":
        reviewer_decision = ai
    elif choice == "override":
        reviewer_decision = DECISIONS[1] if ai == DECISIONS[0] else DECISIONS[0]
    else:
        raise ValueError("choose agree or override")
    marks = []
    for question in questions:
        index = int(question["question_index"])
        mark = form.get(f"answer_{index}", "")
        if mark not in ("", "correct", "wrong"):
            raise ValueError(f"answer {index}: mark it correct or wrong, or leave it")
        if mark:
            marks.append(
                AnswerMark(index, str(question["type"]), str(question["label"]), mark == "correct")
            )
    return Verdict(
        review_id=review_id,
        decision_key=str(decision["idempotency_key"]),
        request_uuid=str(decision["uuid"]),
        shippingid=str(decision["shippingid"]),
        product_id=str(decision["product_id"]),
        model_version=str(decision["model_version"]),
        ai_decision=ai,
        reviewer_decision=reviewer_decision,
        answers=tuple(marks),
        note=form.get("note", "").strip()[:MAX_NOTE],
        reviewer=reviewer,
        reviewed_at=now,
    )
