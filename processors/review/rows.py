"""Sink rows for the review topics; `processors.analytics.rows` routes their records here.

- `verification-review` → one `reviews` row and one `review_answers` row per marked
  answer. The version of both tables is `reviewed_ms` (see 0002_review.sql): a later
  verdict on the same decision supersedes an earlier one.
- `review-image` → one `review_images` row (content-addressed by sha256) and one
  `review_image_refs` row (which request used it, as which image).

Failures are data, as for the other topics: a value that cannot be converted raises
`values.BadValue`, which `processors.analytics.rows.rows_for` turns into a `Failure(INVALID_EVENT)`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from processors.analytics import values
from processors.analytics.values import Rows

if TYPE_CHECKING:
    # Only a type here: processors.analytics.rows imports this module.
    from processors.analytics.rows import SinkRecord

ROLES = frozenset({"vendor", "pickup"})
MAX_NOTE = 2000
MAX_COPY_BYTES = 2 * 1024 * 1024  # far above what images.make_copy produces
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _decision_value(event: Mapping[str, Any], name: str) -> str:
    value = values.text(event, name)
    if value not in values.DECISIONS:
        raise values.BadValue(f"field {name!r} must be 'Pick' or 'Not Pick', got {value[:40]!r}")
    return value


def review_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    """`reviews` and `review_answers` rows of one verdict."""
    review_id, target = values.text(event, "review_id"), values.text(event, "decision_key")
    if not review_id or not target:
        raise values.BadValue("a review needs review_id and decision_key")
    when = values.event_time(event.get("reviewed_at"), record.timestamp_ms, "reviewed_at")
    reviewed_ms = int(when.timestamp() * 1000)
    ai, verdict = _decision_value(event, "ai_decision"), _decision_value(event, "reviewer_decision")
    product_id, model_version = (
        values.text(event, "product_id"),
        values.text(event, "model_version"),
    )
    reviewer = values.text(event, "reviewer")
    if not reviewer:
        raise values.BadValue("a review needs the reviewer's identity")
    marks = event.get("answers") or []
    if not isinstance(marks, list | tuple) or not all(isinstance(m, Mapping) for m in marks):
        raise values.BadValue("field 'answers' must be a list of objects")
    answers = [
        (
            when,
            review_id,
            target,
            values.integer(mark.get("question_index"), "answers.question_index", 0, 65535),
            values.text(mark, "type"),
            values.text(mark, "label"),
            values.boolean(mark.get("correct")),
            product_id,
            model_version,
            reviewer,
            reviewed_ms,
        )
        for mark in marks[:65535]
    ]
    row = (
        when,
        review_id,
        target,
        values.text(event, "request_uuid"),
        values.text(event, "shippingid"),
        product_id,
        model_version,
        ai,
        verdict,
        ai == verdict,  # derived, so a producer's inconsistent `agrees` cannot skew reports
        len(answers),
        sum(1 for a in answers if not a[6]),
        reviewer,
        values.text(event, "note")[:MAX_NOTE],
        reviewed_ms,
    )
    return {"reviews": [row], "review_answers": answers}


def image_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    """`review_images` and `review_image_refs` rows of one review copy.

    The sha256 is checked against the bytes: the page serves copies by that address.
    """
    jpeg = values.raw_bytes(event.get("jpeg"), "jpeg")
    digest = values.text(event, "sha256")
    if not _SHA256.match(digest) or hashlib.sha256(jpeg).hexdigest() != digest:
        raise values.BadValue("field 'sha256' is not the SHA-256 of the jpeg bytes")
    if not jpeg.startswith(b"\xff\xd8") or len(jpeg) > MAX_COPY_BYTES:
        raise values.BadValue(f"field 'jpeg' is not a JPEG of at most {MAX_COPY_BYTES} bytes")
    role = values.text(event, "role")
    if role not in ROLES:
        raise values.BadValue(f"field 'role' must be vendor or pickup, got {role[:20]!r}")
    when = values.event_time(event.get("created_at"), record.timestamp_ms, "created_at")
    image = (
        when,
        digest,
        jpeg,
        values.integer(event.get("width"), "width", 1, 4096),
        values.integer(event.get("height"), "height", 1, 4096),
        len(jpeg),
    )
    ref = (
        when,
        values.text(event, "request_uuid"),
        values.text(event, "decision_key"),
        role,
        values.integer(event.get("image_index"), "image_index", 0, 65535),
        digest,
    )
    return {"review_images": [image], "review_image_refs": [ref]}
