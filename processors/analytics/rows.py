"""The rows each analytics topic becomes: one function per contract, and `rows_for()`.

Pure: no I/O. `rows_for()` converts one consumed record (`SinkRecord`) into rows per
table, in the column order of `COLUMNS` followed by `POSITION_COLUMNS` (the record's
own Kafka position, appended to every row). Which converter applies is decided by
the record's contract (`processors.contracts.Topics.schema_of`), so renamed topics
keep their tables. An unknown topic or a value that cannot be converted
(`values.BadValue`) is returned as a `Failure(INVALID_EVENT)`, never raised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from processors import contracts
from processors.analytics import values
from processors.analytics.values import Rows
from processors.errors import ErrorCode, Failure
from processors.records import input_key
from processors.review import rows as review_rows

STAGE = "sink"


@dataclass(frozen=True, slots=True)
class SinkRecord:
    """One consumed Kafka message: its position, decoded value and timestamp (ms, UTC).

    `value` is the event as `to_event()` of `processors.records` produces it (dead
    letters carry `bytes`).
    """

    topic: str
    partition: int
    offset: int
    value: Mapping[str, Any]
    timestamp_ms: int


# Column order of every insert; must match the DDL (a test compares them).
COLUMNS: dict[str, tuple[str, ...]] = {
    "pickup_requests": (
        "event_time", "event_id", "idempotency_key", "shippingid", "uuid", "previousuuid",
        "is_retake", "productid", "productname", "question", "vendor_images",
        "pickup_image_count", "pickup_image_urls",
    ),
    "inference_attempts": (
        "event_time", "idempotency_key", "attempt", "request_uuid", "shippingid", "prompt_hash",
        "raw_output", "validation_status", "validation_error", "model_version", "batch_id",
        "batch_size", "gather_ms", "model_ms",
    ),
    "verification_decisions": (
        "event_time", "idempotency_key", "shippingid", "uuid", "product_id", "ai_decision",
        "final_action", "ai_match_score", "recommendation", "status", "status_code",
        "processing_time_ai", "total_time", "model_version", "question_count",
        "retake_question_count", "retake_requested", "test_product_description",
        "reference_product_description", "comparison", "input_topic", "input_partition",
        "input_offset",
    ),
    "question_answers": (
        "event_time", "idempotency_key", "question_index", "uuid", "shippingid", "product_id",
        "type", "label", "is_mandatory", "value_to_check", "answer", "evidence", "confidence",
        "is_retake_image", "ai_decision", "model_version",
    ),
    "product_listings": (
        "event_time", "event_id", "idempotency_key", "product_id", "title", "description",
        "has_image", "image_url", "top_k_tags",
    ),
    "category_tags": (
        "event_time", "idempotency_key", "product_id", "category", "score", "top_categories",
        "top_probs", "tags", "used_text", "used_image", "model_version", "input_topic",
        "input_partition", "input_offset",
    ),
    "dead_letters": (
        "event_time", "original_topic", "original_partition", "original_offset", "original_key",
        "original_value", "original_size", "error_code", "error_name", "error_message", "stage",
        "request_uuid", "shippingid", "extra",
    ),
    # The review loop (0002_review.sql; rows built by processors/review/rows.py).
    "reviews": (
        "event_time", "review_id", "decision_key", "request_uuid", "shippingid", "product_id",
        "model_version", "ai_decision", "reviewer_decision", "agrees", "answers_marked",
        "answers_wrong", "reviewer", "note", "reviewed_ms",
    ),
    "review_answers": (
        "event_time", "review_id", "decision_key", "question_index", "type", "label", "correct",
        "product_id", "model_version", "reviewer", "reviewed_ms",
    ),
    "review_images": ("event_time", "sha256", "jpeg", "width", "height", "size_bytes"),
    "review_image_refs": (
        "event_time", "request_uuid", "decision_key", "role", "image_index", "sha256",
    ),
}  # fmt: skip
# Appended to every row by the sink, from the record's own position.
POSITION_COLUMNS = ("source_topic", "source_partition", "source_offset", "kafka_time", "version")
TABLES = tuple(COLUMNS)


def _key(value: Any, record: SinkRecord) -> str:
    """The idempotency key, or the record's own position when the producer sent none."""
    if isinstance(value, str) and value:
        return value
    return f"pos:{record.topic}:{record.partition}:{record.offset}"


def _input_event_columns(
    event: Mapping[str, Any], record: SinkRecord, contract: str
) -> tuple[Any, str, str]:
    """(occurred at, event id, idempotency key) of an input event, the first columns of its row.

    The key is `input_key()`, the one the inference worker gives every output of the event.
    """
    return (
        values.event_time(event.get("occurred_at"), record.timestamp_ms, "occurred_at"),
        values.text(event, "event_id"),
        input_key(contract, event),
    )


def _pickup_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    previous = values.text(event, "previousuuid")
    pickup = values.str_list(event.get("skupickdone"), "skupickdone")
    row = (
        *_input_event_columns(event, record, contracts.PICKUP_COMPLETED),
        values.text(event, "shippingid"),
        values.text(event, "uuid"),
        previous,
        bool(previous),
        values.text(event, "productid"),
        values.text(event, "productname"),
        values.text(event, "question"),
        values.str_list(event.get("pickupproductimage"), "pickupproductimage"),
        min(len(pickup), 255),
        [p for p in pickup if values.is_url(p)],
    )
    return {"pickup_requests": [row]}


def _listing_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    image = values.text(event, "image")
    row = (
        *_input_event_columns(event, record, contracts.PRODUCT_LISTED),
        values.text(event, "product_id"),
        values.text(event, "title"),
        values.text(event, "description"),
        bool(image),
        image if values.is_url(image) else "",
        values.integer(event.get("top_k_tags", 5), "top_k_tags", 0, 255),
    )
    return {"product_listings": [row]}


def _decision_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    decision = values.text(event, "ai_decision")
    final_action = values.text(event, "finalAction") or decision
    for name, value in (("ai_decision", decision), ("finalAction", final_action)):
        if value not in values.DECISIONS:
            raise values.BadValue(
                f"field {name!r} must be 'Pick' or 'Not Pick', got {value[:40]!r}"
            )
    when = values.iso_time(event.get("timestamp"), record.timestamp_ms)
    key = _key(event.get("idempotency_key"), record)
    uuid, shippingid = values.text(event, "uuid"), values.text(event, "shippingid")
    product_id, model_version = (
        values.text(event, "product_id"),
        values.text(event, "model_version"),
    )
    questions = event.get("Question") or []
    if not isinstance(questions, list | tuple) or not all(
        isinstance(q, Mapping) for q in questions
    ):
        raise values.BadValue("field 'Question' must be a list of objects")
    answers: list[tuple[Any, ...]] = []
    for index, q in enumerate(questions[:65535]):
        answers.append(
            (
                when,
                key,
                index,
                uuid,
                shippingid,
                product_id,
                values.text(q, "Type"),
                values.text(q, "Label"),
                values.boolean(q.get("IsMandatory")),
                values.text(q, "ValueToCheck"),
                values.text(q, "answer"),
                values.text(q, "Evidence"),
                values.number(q.get("Confidence", 0.0), "Confidence"),
                values.boolean(q.get("isRetakeImage")),
                decision,
                model_version,
            )
        )
    retakes = sum(1 for a in answers if a[13])
    analysis = event.get("analysis") or {}
    if not isinstance(analysis, Mapping):
        raise values.BadValue("field 'analysis' must be an object")
    row = (
        when,
        key,
        shippingid,
        uuid,
        product_id,
        decision,
        final_action,
        values.number(event.get("ai_match_score", 0.0), "ai_match_score"),
        values.text(event, "recommendation"),
        values.text(event, "status"),
        values.integer(event.get("StatusCode", 0), "StatusCode", 0, 65535),
        values.number(event.get("processing_time_ai", 0.0), "processing_time_ai"),
        values.number(event.get("total_time", 0.0), "total_time"),
        model_version,
        len(answers),
        retakes,
        retakes > 0,
        values.text(analysis, "test_product_description"),
        values.text(analysis, "reference_product_description"),
        values.text(analysis, "comparison"),
        *values.input_position(event.get("source")),
    )
    return {"verification_decisions": [row], "question_answers": answers}


def _attempt_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    status = values.text(event, "validation_status")
    if status not in values.VALIDATION_STATUSES:
        raise values.BadValue(
            f"field 'validation_status' must be valid or invalid, got {status[:40]!r}"
        )
    row = (
        values.event_time(event.get("occurred_at"), record.timestamp_ms, "occurred_at"),
        _key(event.get("idempotency_key"), record),
        values.integer(event.get("attempt"), "attempt", 1, 255),
        values.text(event, "request_uuid"),
        values.text(event, "shippingid"),
        values.text(event, "prompt_hash"),
        values.text(event, "raw_output"),
        status,
        values.text(event, "validation_error"),
        values.text(event, "model_version"),
        values.text(event, "batch_id"),
        values.integer(event.get("batch_size", 0), "batch_size", 0, 65535),
        values.number(event.get("gather_ms", 0.0), "gather_ms"),
        values.number(event.get("model_ms", 0.0), "model_ms"),
    )
    return {"inference_attempts": [row]}


def _tag_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    top = event.get("top_categories") or []
    if not isinstance(top, list | tuple) or not all(isinstance(t, Mapping) for t in top):
        raise values.BadValue("field 'top_categories' must be a list of objects")
    row = (
        values.ms_to_time(record.timestamp_ms),
        _key(event.get("idempotency_key"), record),
        values.text(event, "product_id"),
        values.text(event, "category"),
        values.number(event.get("score", 0.0), "score"),
        [values.text(t, "category") for t in top],
        [values.number(t.get("prob", 0.0), "top_categories.prob") for t in top],
        values.str_list(event.get("tags"), "tags"),
        values.boolean(event.get("used_text", True)),
        values.boolean(event.get("used_image", True)),
        values.text(event, "model_version"),
        *values.input_position(event.get("source")),
    )
    return {"category_tags": [row]}


def _dead_letter_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    extra = event.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise values.BadValue("field 'extra' must be a map of strings")
    value = values.raw_bytes(event.get("original_value"), "original_value")
    row = (
        values.event_time(event.get("failed_at"), record.timestamp_ms, "failed_at"),
        values.text(event, "source_topic"),
        values.integer(event.get("source_partition", -1), "source_partition", -1, 2**31 - 1),
        values.integer(event.get("source_offset", -1), "source_offset", -1, 2**63 - 1),
        values.raw_bytes(event.get("original_key"), "original_key"),
        value,
        min(len(value), 2**32 - 1),
        values.integer(event.get("error_code", 0), "error_code", 0, 65535),
        values.text(event, "error_name"),
        values.text(event, "error_message"),
        values.text(event, "stage"),
        values.text(event, "request_uuid"),
        values.text(event, "shippingid"),
        {str(k): v if isinstance(v, str) else str(v) for k, v in extra.items()},
    )
    return {"dead_letters": [row]}


_Converter = Callable[[Mapping[str, Any], SinkRecord], Rows]

#: The converter of each contract; the review topics' rows live with the review loop.
CONVERTERS: Final[Mapping[str, _Converter]] = MappingProxyType(
    {
        contracts.PICKUP_COMPLETED: _pickup_rows,
        contracts.PRODUCT_LISTED: _listing_rows,
        contracts.VERIFICATION_DECISION: _decision_rows,
        contracts.CATEGORY_TAG: _tag_rows,
        contracts.VERIFICATION_ATTEMPTS: _attempt_rows,
        contracts.DEAD_LETTER: _dead_letter_rows,
        contracts.VERIFICATION_REVIEW: review_rows.review_rows,
        contracts.REVIEW_IMAGE: review_rows.image_rows,
    }
)


def rows_for(
    record: SinkRecord, topics: contracts.Topics = contracts.DEFAULT_TOPICS
) -> Rows | Failure:
    """The rows one record becomes, per table (position columns included), or a `Failure`.

    Pure: no I/O. The record's contract (`topics.schema_of`) picks the converter. An
    unknown topic, a value that is not an object or a field that cannot be converted
    -> `Failure(INVALID_EVENT)`; never raises for bad data.
    """
    try:
        converter = CONVERTERS[topics.schema_of(record.topic)]
    except KeyError:
        return Failure(ErrorCode.INVALID_EVENT, f"no table for topic {record.topic!r}", STAGE)
    if not isinstance(record.value, Mapping):
        return Failure(ErrorCode.INVALID_EVENT, "the value is not an object", STAGE)
    try:
        position = (
            record.topic,
            values.integer(record.partition, "partition", 0, 2**32 - 1),
            values.integer(record.offset, "offset", 0, 2**63 - 1),
            values.ms_to_time(record.timestamp_ms),
            values.integer(record.timestamp_ms, "timestamp_ms", 0, 2**63 - 1),
        )
        tables = converter(record.value, record)
    except values.BadValue as exc:
        return Failure(ErrorCode.INVALID_EVENT, str(exc), STAGE)
    return {table: [(*row, *position) for row in rows] for table, rows in tables.items() if rows}


__all__ = ["COLUMNS", "CONVERTERS", "POSITION_COLUMNS", "STAGE", "TABLES", "SinkRecord", "rows_for"]
