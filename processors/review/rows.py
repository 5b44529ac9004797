"""Sink rows for the review topics; `processors.sink` routes their records here.

- `verification-review` → one `reviews` row and one `review_answers` row per marked
  answer. The version of both tables is `reviewed_ms` (see 0002_review.sql): a later
  verdict on the same decision supersedes an earlier one.
- `review-image` → one `review_images` row (content-addressed by sha256) and one
  `review_image_refs` row (which request used it, as which image).

Failures are data, as for the other topics: a value that cannot be converted raises
the sink's `_BadValue`, which `rows_for` turns into a `Failure(INVALID_EVENT)`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from processors.analytics.sink import (
    DECISIONS,
    Rows,
    SinkRecord,
    _BadValue,
    _bool,
    _event_time,
    _int,
    _raw_bytes,
    _text,
)

ROLES = frozenset({"vendor", "pickup"})
MAX_NOTE = 2000
MAX_COPY_BYTES = 2 * 1024 * 1024  # far above what images.make_copy produces
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _decision_value(event: Mapping[str, Any], name: str) -> str:
    value = _text(event, name)
    if value not in DECISIONS:
        raise _BadValue(f"field {name!r} must be 'Pick' or 'Not Pick', got {value[:40]!r}")
    return value


def review_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    """`reviews` and `review_answers` rows of one verdict."""
    review_id, target = _text(event, "review_id"), _text(event, "decision_key")
    if not review_id or not target:
        raise _BadValue("a review needs review_id and decision_key")
    when = _event_time(event.get("reviewed_at"), record.timestamp_ms, "reviewed_at")
    reviewed_ms = int(when.timestamp() * 1000)
    ai, verdict = _decision_value(event, "ai_decision"), _decision_value(event, "reviewer_decision")
    product_id, model_version = _text(event, "product_id"), _text(event, "model_version")
    reviewer = _text(event, "reviewer")
    if not reviewer:
        raise _BadValue("a review needs the reviewer's identity")
    marks = event.get("answers") or []
    if not isinstance(marks, list | tuple) or not all(isinstance(m, Mapping) for m in marks):
        raise _BadValue("field 'answers' must be a list of objects")
    answers = [
        (
            when,
            review_id,
            target,
            _int(mark.get("question_index"), "answers.question_index", 0, 65535),
            _text(mark, "type"),
            _text(mark, "label"),
            _bool(mark.get("correct")),
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
        _text(event, "request_uuid"),
        _text(event, "shippingid"),
        product_id,
        model_version,
        ai,
        verdict,
        ai == verdict,  # derived, so a producer's inconsistent `agrees` cannot skew reports
        len(answers),
        sum(1 for a in answers if not a[6]),
        reviewer,
        _text(event, "note")[:MAX_NOTE],
        reviewed_ms,
    )
    return {"reviews": [row], "review_answers": answers}


def image_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    """`review_images` and `review_image_refs` rows of one review copy.

    The sha256 is checked against the bytes: the page serves copies by that address.
    """
    jpeg = _raw_bytes(event.get("jpeg"), "jpeg")
    digest = _text(event, "sha256")
    if not _SHA256.match(digest) or hashlib.sha256(jpeg).hexdigest() != digest:
        raise _BadValue("field 'sha256' is not the SHA-256 of the jpeg bytes")
    if not jpeg.startswith(b"\xff\xd8") or len(jpeg) > MAX_COPY_BYTES:
        raise _BadValue(f"field 'jpeg' is not a JPEG of at most {MAX_COPY_BYTES} bytes")
    role = _text(event, "role")
    if role not in ROLES:
        raise _BadValue(f"field 'role' must be vendor or pickup, got {role[:20]!r}")
    when = _event_time(event.get("created_at"), record.timestamp_ms, "created_at")
    image = (
        when,
        digest,
        jpeg,
        _int(event.get("width"), "width", 1, 4096),
        _int(event.get("height"), "height", 1, 4096),
        len(jpeg),
    )
    ref = (
        when,
        _text(event, "request_uuid"),
        _text(event, "decision_key"),
        role,
        _int(event.get("image_index"), "image_index", 0, 65535),
        digest,
    )
    return {"review_images": [image], "review_image_refs": [ref]}
