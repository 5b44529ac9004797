"""ClickHouse analytics sink: buffers decoded events and writes them in batched inserts.

Contract (Quix Streams style): `setup()` opens the connection and applies the
migrations; `add()` only buffers; `flush()` writes and tells the caller up to which
offset of each (topic, partition) the data is stored, so Kafka is acknowledged only
up to there. If ClickHouse is unreachable (or fails for a reason that is not about
the rows), `flush()` raises `SinkUnavailable` and keeps every buffered row: nothing
is dropped, and the next `flush()` retries the same batches with the same
deduplication tokens. If ClickHouse rejects the rows of an insert (a value it cannot
store, a constraint, more month partitions than one insert may hold), the batch is
split and the parts inserted, down to single rows; a row still rejected alone is
recorded in `sink_failures` with the error and its Kafka position, and counts as
handled (see `processors.sink_rejections`).

Connection and migrations: `processors.clickhouse` (one DSN for the embedded chDB
engine or a server; its names are re-exported here).

Dedup design, two layers:

1. Exact retries are dropped by the server. Each insert carries
   `insert_deduplication_token = "<table>:<topic>:<partition>:<first>-<last>"`, and
   every table has `non_replicated_deduplication_window = 1000`. Boundary rule: an
   insert holds the records of ONE (topic, partition) inside ONE aligned offset
   block (`offset // offset_block`), and first/last are the lowest and highest
   offset of the records buffered for that block. Batches are sealed at the start
   of `flush()` and kept unchanged until written, so a retry after
   `SinkUnavailable` repeats the same tokens; records added meanwhile form new
   batches. A new process that re-reads after a crash (Kafka resumes at the last
   acknowledged offset + 1, which is always a batch start) produces the same token
   for every block it re-reads in full (all but the block it stops in). The server
   remembers the last 1000 inserted parts per table; older retries fall to layer 2.
2. Whatever still arrives twice collapses on its key: a partial block re-read with
   other boundaries, or an upstream redelivery that produced the same output at a
   new offset. Tables are `ReplacingMergeTree(version)` ordered by the dedup key:
   the input's idempotency key for outputs (`(idempotency_key, attempt)` for
   attempts, `(idempotency_key, question_index)` for answers), the source position
   for raw inputs, the original position for dead letters. `version` is the Kafka
   timestamp of the message, so the later copy wins. Reports do not rely on
   background merges or on FINAL (FINAL collapses within one partition only, and a
   redelivered output can land in the next month's partition): each report reads
   `ORDER BY version DESC LIMIT 1 BY <key>`, which counts each input once. (Two
   copies of a key inside one insert already collapse on write: optimize_on_insert.)

Bad data is data, not an outage: `add()` validates and converts every value to its
column type (Enum8 members, integer ranges, times), so the server rarely rejects a
batch for its content; a record it cannot convert, or from an unknown topic, is
returned as a `Failure` and counted, and its offset still counts as handled. What
the server still rejects is split and isolated in `flush()`, as above.

Not thread-safe: call it from the one thread that consumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from processors.analytics.client import (
    DEDUP_SETTING,
    MIGRATIONS_DIR,
    AnalyticsClient,
    MigrationError,
    SinkUnavailable,
    apply_migrations,
    load_migrations,
    open_client,
    redact_dsn,
    split_sql,
)
from processors.analytics.client import scrub_secrets as _scrub
from processors.analytics.rejections import (
    DEFAULT_MAX_PARTITIONS_PER_INSERT,
    FAILURE_COLUMNS,
    FAILURES_TABLE,
    failure_row,
    rejection_code,
    split_rows,
)
from processors.errors import ErrorCode, Failure
from processors.records import LISTING_CONTRACT, PICKUP_CONTRACT, input_key

logger = logging.getLogger(__name__)

STAGE = "sink"


# -------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SinkTopics:
    """Names of the topics the sink reads; each maps to its tables (fixed by the DDL)."""

    pickup_completed: str = "pickup-completed"
    product_listed: str = "product-listed"
    verification_decision: str = "verification-decision"
    category_tag: str = "category-tag"
    verification_attempts: str = "verification-attempts"
    dead_letter: str = "dead-letter"
    verification_review: str = "verification-review"
    review_image: str = "review-image"

    def all(self) -> tuple[str, ...]:
        return (
            self.pickup_completed,
            self.product_listed,
            self.verification_decision,
            self.category_tag,
            self.verification_attempts,
            self.dead_letter,
            self.verification_review,
            self.review_image,
        )


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


@dataclass(frozen=True, slots=True)
class FlushResult:
    """What one successful `flush()` stored.

    `offsets`: the highest offset per (topic, partition) now handled, inclusive;
    acknowledge Kafka with `offset + 1` (`commit_offsets()`). Handled means stored,
    or rejected as a `Failure` by `add()` (those will never be stored).
    `rows`: rows sent per table (the server drops the ones a token already stored).
    `inserts`: insert statements sent. `rejected`: records `add()` rejected since
    the previous successful flush. `splits`: rejected inserts split into parts.
    `failed_rows`: rows ClickHouse rejected even alone, recorded in `sink_failures`
    (their offsets count as handled).
    """

    offsets: Mapping[tuple[str, int], int] = field(default_factory=dict)
    rows: Mapping[str, int] = field(default_factory=dict)
    inserts: int = 0
    rejected: int = 0
    splits: int = 0
    failed_rows: int = 0

    def commit_offsets(self) -> dict[tuple[str, int], int]:
        """The offsets to commit to Kafka: the next offset to read per (topic, partition)."""
        return {tp: offset + 1 for tp, offset in self.offsets.items()}


@dataclass(frozen=True, slots=True)
class InsertBatch:
    """One sealed insert: rows of one table from one offset block of one (topic, partition).

    `part` is empty for a whole block, or the path of `split_rows()` labels that cut
    this part out of a rejected block (e.g. `m200001-200804/r0-9`).
    """

    table: str
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    rows: tuple[tuple[Any, ...], ...]
    part: str = ""

    @property
    def token(self) -> str:
        """The `insert_deduplication_token`; equal for equal boundaries, in any process."""
        base = f"{self.table}:{self.topic}:{self.partition}:{self.first_offset}-{self.last_offset}"
        return f"{base}/{self.part}" if self.part else base


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

DECISIONS = frozenset({"Pick", "Not Pick"})
VALIDATION_STATUSES = frozenset({"valid", "invalid"})
_MIN_TIME_MS = 0  # DateTime64 covers 1900-2299; events before 1970 are errors here
_MAX_TIME_MS = 10_413_792_000_000  # 2300-01-01


class _BadValue(ValueError):
    """A field that cannot be converted to its column type."""


def _text(event: Mapping[str, Any], name: str) -> str:
    value = event.get(name)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise _BadValue(f"field {name!r} must be a string, got {type(value).__name__}")


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadValue(f"field {name!r} must be an integer, got {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise _BadValue(f"field {name!r} must be an integer, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise _BadValue(f"field {name!r} must be within {low}..{high}, got {number}")
    return number


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadValue(f"field {name!r} must be a number, got {type(value).__name__}")
    return float(value)


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def _ms_to_time(ms: int) -> datetime:
    if not _MIN_TIME_MS <= ms < _MAX_TIME_MS:
        raise _BadValue(f"time {ms} ms is outside 1970-2299")
    return datetime.fromtimestamp(ms / 1000, UTC)


def _event_time(value: Any, fallback_ms: int, name: str) -> datetime:
    """Epoch ms (or an aware datetime, as fastavro decodes it); 0/None -> the fallback."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if value is None or value == 0:
        return _ms_to_time(fallback_ms)
    return _ms_to_time(_int(value, name, _MIN_TIME_MS, _MAX_TIME_MS - 1))


def _iso_time(value: Any, fallback_ms: int) -> datetime:
    if not isinstance(value, str) or not value:
        return _ms_to_time(fallback_ms)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _BadValue(f"timestamp {value[:40]!r} is not ISO 8601") from None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _BadValue(f"field {name!r} must be a list of strings")
    return list(value)


def _raw_bytes(value: Any, name: str) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise _BadValue(f"field {name!r} must be bytes")


def _key(value: Any, record: SinkRecord) -> str:
    """The idempotency key, or the record's own position when the producer sent none."""
    if isinstance(value, str) and value:
        return value
    return f"pos:{record.topic}:{record.partition}:{record.offset}"


def _input_position(value: Any) -> tuple[str, int, int]:
    if not isinstance(value, Mapping):
        return ("", -1, -1)
    return (
        _text(value, "topic"),
        _int(value.get("partition", -1), "source.partition", -1, 2**31 - 1),
        _int(value.get("offset", -1), "source.offset", -1, 2**63 - 1),
    )


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


Rows = dict[str, list[tuple[Any, ...]]]


def _input_event_columns(
    event: Mapping[str, Any], record: SinkRecord, contract: str
) -> tuple[Any, str, str]:
    """(occurred at, event id, idempotency key) of an input event, the first columns of its row.

    The key is `input_key()`, the one the inference worker gives every output of the event.
    """
    return (
        _event_time(event.get("occurred_at"), record.timestamp_ms, "occurred_at"),
        _text(event, "event_id"),
        input_key(contract, event),
    )


def _pickup_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    previous = _text(event, "previousuuid")
    pickup = _str_list(event.get("skupickdone"), "skupickdone")
    row = (
        *_input_event_columns(event, record, PICKUP_CONTRACT),
        _text(event, "shippingid"),
        _text(event, "uuid"),
        previous,
        bool(previous),
        _text(event, "productid"),
        _text(event, "productname"),
        _text(event, "question"),
        _str_list(event.get("pickupproductimage"), "pickupproductimage"),
        min(len(pickup), 255),
        [p for p in pickup if _is_url(p)],
    )
    return {"pickup_requests": [row]}


def _listing_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    image = _text(event, "image")
    row = (
        *_input_event_columns(event, record, LISTING_CONTRACT),
        _text(event, "product_id"),
        _text(event, "title"),
        _text(event, "description"),
        bool(image),
        image if _is_url(image) else "",
        _int(event.get("top_k_tags", 5), "top_k_tags", 0, 255),
    )
    return {"product_listings": [row]}


def _decision_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    decision = _text(event, "ai_decision")
    final_action = _text(event, "finalAction") or decision
    for name, value in (("ai_decision", decision), ("finalAction", final_action)):
        if value not in DECISIONS:
            raise _BadValue(f"field {name!r} must be 'Pick' or 'Not Pick', got {value[:40]!r}")
    when = _iso_time(event.get("timestamp"), record.timestamp_ms)
    key = _key(event.get("idempotency_key"), record)
    uuid, shippingid = _text(event, "uuid"), _text(event, "shippingid")
    product_id, model_version = _text(event, "product_id"), _text(event, "model_version")
    questions = event.get("Question") or []
    if not isinstance(questions, list | tuple) or not all(
        isinstance(q, Mapping) for q in questions
    ):
        raise _BadValue("field 'Question' must be a list of objects")
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
                _text(q, "Type"),
                _text(q, "Label"),
                _bool(q.get("IsMandatory")),
                _text(q, "ValueToCheck"),
                _text(q, "answer"),
                _text(q, "Evidence"),
                _float(q.get("Confidence", 0.0), "Confidence"),
                _bool(q.get("isRetakeImage")),
                decision,
                model_version,
            )
        )
    retakes = sum(1 for a in answers if a[13])
    analysis = event.get("analysis") or {}
    if not isinstance(analysis, Mapping):
        raise _BadValue("field 'analysis' must be an object")
    row = (
        when,
        key,
        shippingid,
        uuid,
        product_id,
        decision,
        final_action,
        _float(event.get("ai_match_score", 0.0), "ai_match_score"),
        _text(event, "recommendation"),
        _text(event, "status"),
        _int(event.get("StatusCode", 0), "StatusCode", 0, 65535),
        _float(event.get("processing_time_ai", 0.0), "processing_time_ai"),
        _float(event.get("total_time", 0.0), "total_time"),
        model_version,
        len(answers),
        retakes,
        retakes > 0,
        _text(analysis, "test_product_description"),
        _text(analysis, "reference_product_description"),
        _text(analysis, "comparison"),
        *_input_position(event.get("source")),
    )
    return {"verification_decisions": [row], "question_answers": answers}


def _attempt_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    status = _text(event, "validation_status")
    if status not in VALIDATION_STATUSES:
        raise _BadValue(f"field 'validation_status' must be valid or invalid, got {status[:40]!r}")
    row = (
        _event_time(event.get("occurred_at"), record.timestamp_ms, "occurred_at"),
        _key(event.get("idempotency_key"), record),
        _int(event.get("attempt"), "attempt", 1, 255),
        _text(event, "request_uuid"),
        _text(event, "shippingid"),
        _text(event, "prompt_hash"),
        _text(event, "raw_output"),
        status,
        _text(event, "validation_error"),
        _text(event, "model_version"),
        _text(event, "batch_id"),
        _int(event.get("batch_size", 0), "batch_size", 0, 65535),
        _float(event.get("gather_ms", 0.0), "gather_ms"),
        _float(event.get("model_ms", 0.0), "model_ms"),
    )
    return {"inference_attempts": [row]}


def _tag_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    top = event.get("top_categories") or []
    if not isinstance(top, list | tuple) or not all(isinstance(t, Mapping) for t in top):
        raise _BadValue("field 'top_categories' must be a list of objects")
    row = (
        _ms_to_time(record.timestamp_ms),
        _key(event.get("idempotency_key"), record),
        _text(event, "product_id"),
        _text(event, "category"),
        _float(event.get("score", 0.0), "score"),
        [_text(t, "category") for t in top],
        [_float(t.get("prob", 0.0), "top_categories.prob") for t in top],
        _str_list(event.get("tags"), "tags"),
        _bool(event.get("used_text", True)),
        _bool(event.get("used_image", True)),
        _text(event, "model_version"),
        *_input_position(event.get("source")),
    )
    return {"category_tags": [row]}


def _dead_letter_rows(event: Mapping[str, Any], record: SinkRecord) -> Rows:
    extra = event.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise _BadValue("field 'extra' must be a map of strings")
    value = _raw_bytes(event.get("original_value"), "original_value")
    row = (
        _event_time(event.get("failed_at"), record.timestamp_ms, "failed_at"),
        _text(event, "source_topic"),
        _int(event.get("source_partition", -1), "source_partition", -1, 2**31 - 1),
        _int(event.get("source_offset", -1), "source_offset", -1, 2**63 - 1),
        _raw_bytes(event.get("original_key"), "original_key"),
        value,
        min(len(value), 2**32 - 1),
        _int(event.get("error_code", 0), "error_code", 0, 65535),
        _text(event, "error_name"),
        _text(event, "error_message"),
        _text(event, "stage"),
        _text(event, "request_uuid"),
        _text(event, "shippingid"),
        {str(k): v if isinstance(v, str) else str(v) for k, v in extra.items()},
    )
    return {"dead_letters": [row]}


_Converter = Callable[[Mapping[str, Any], SinkRecord], Rows]


def _converters(topics: SinkTopics) -> dict[str, _Converter]:
    # Imported here: the review rows build on this module's value helpers.
    from processors.review import rows as review_rows

    return {
        topics.pickup_completed: _pickup_rows,
        topics.product_listed: _listing_rows,
        topics.verification_decision: _decision_rows,
        topics.category_tag: _tag_rows,
        topics.verification_attempts: _attempt_rows,
        topics.dead_letter: _dead_letter_rows,
        topics.verification_review: review_rows.review_rows,
        topics.review_image: review_rows.image_rows,
    }


def rows_for(record: SinkRecord, topics: SinkTopics = SinkTopics()) -> Rows | Failure:
    """The rows one record becomes, per table (position columns included), or a `Failure`.

    Pure: no I/O. Unknown topic or an unconvertible value -> `Failure(INVALID_EVENT)`.
    """
    converter = _converters(topics).get(record.topic)
    if converter is None:
        return Failure(ErrorCode.INVALID_EVENT, f"no table for topic {record.topic!r}", STAGE)
    if not isinstance(record.value, Mapping):
        return Failure(ErrorCode.INVALID_EVENT, "the value is not an object", STAGE)
    try:
        position = (
            record.topic,
            _int(record.partition, "partition", 0, 2**32 - 1),
            _int(record.offset, "offset", 0, 2**63 - 1),
            _ms_to_time(record.timestamp_ms),
            _int(record.timestamp_ms, "timestamp_ms", 0, 2**63 - 1),
        )
        tables = converter(record.value, record)
    except _BadValue as exc:
        return Failure(ErrorCode.INVALID_EVENT, str(exc), STAGE)
    return {table: [(*row, *position) for row in rows] for table, rows in tables.items() if rows}


# ----------------------------------------------------------------------------- sink


class AnalyticsSink:
    """Buffers decoded events from the `SinkTopics` topics and writes them to ClickHouse.

    `add()` buffers, `should_flush()` says when (row count or interval), `flush()`
    writes and returns the offsets now safe to acknowledge. See the module docstring
    for the dedup design and the failure behaviour.
    """

    def __init__(
        self,
        dsn: str,
        *,
        max_rows: int = 500,
        max_interval_s: float = 2.0,
        topics: SinkTopics = SinkTopics(),
        offset_block: int = 1000,
        client_factory: Callable[[str], AnalyticsClient] = open_client,
        clock: Callable[[], float] = time.monotonic,
        max_partitions_per_insert: int = DEFAULT_MAX_PARTITIONS_PER_INSERT,
    ) -> None:
        """Record the configuration; no I/O (the client opens in `setup()`).

        `offset_block`: width of the aligned offset blocks that bound an insert (see
        the module docstring). `client_factory`: the seam for tests (default
        `open_client`). `max_partitions_per_insert`: the most month partitions a
        part of a split block spans (the server's `max_partitions_per_insert_block`).
        Raises `ValueError` for a non-positive limit.
        """
        if max_rows < 1 or offset_block < 1 or max_interval_s <= 0:
            raise ValueError("max_rows, offset_block and max_interval_s must be positive")
        if max_partitions_per_insert < 1:
            raise ValueError("max_partitions_per_insert must be positive")
        self.max_partitions_per_insert = max_partitions_per_insert
        self._dsn = dsn
        self.max_rows = max_rows
        self.max_interval_s = max_interval_s
        self.topics = topics
        self.offset_block = offset_block
        self._client_factory = client_factory
        self._clock = clock
        self._converters = _converters(topics)
        self._client: AnalyticsClient | None = None
        # Open (not yet sealed) records: (topic, partition) -> offset -> table rows.
        self._open: dict[tuple[str, int], dict[int, Rows]] = {}
        self._open_rows = 0
        # Sealed batches not yet written, and the offsets they complete.
        self._pending: list[InsertBatch] = []
        self._pending_offsets: dict[tuple[str, int], int] = {}
        # Highest offset sealed per (topic, partition): lower offsets are re-reads.
        self._sealed: dict[tuple[str, int], int] = {}
        self._since: float | None = None
        self._rejected = 0
        self.rejected_total = 0
        self.duplicates_skipped = 0
        # Since the previous successful flush: rejected inserts split, rows isolated.
        self._splits = 0
        self._failed_rows = 0
        self.failed_rows_total = 0

    def __repr__(self) -> str:
        return f"AnalyticsSink({redact_dsn(self._dsn)!r}, max_rows={self.max_rows})"

    @property
    def dsn(self) -> str:
        """The DSN with its password redacted."""
        return redact_dsn(self._dsn)

    def setup(self) -> list[int]:
        """Open the client and apply pending migrations; return the versions applied.

        Raises `SinkUnavailable` when ClickHouse cannot be reached or migrated, and
        `MigrationError` when an applied migration file was edited.
        """
        if self._client is None:
            self._client = self._client_factory(self._dsn)
            logger.info("analytics sink connected to %s", self.dsn)
        try:
            return apply_migrations(self._client)
        except MigrationError:
            raise
        except Exception as exc:
            message = _scrub(f"{type(exc).__name__}: {exc}", self._dsn)
            raise SinkUnavailable(f"cannot migrate {self.dsn}: {message}") from exc

    @property
    def client(self) -> AnalyticsClient:
        """The open client; raises `RuntimeError` before `setup()`."""
        if self._client is None:
            raise RuntimeError("AnalyticsSink.setup() was not called")
        return self._client

    def add(self, record: SinkRecord) -> Failure | None:
        """Buffer one record's rows; never writes, never raises for bad data.

        Returns `None` when buffered (or skipped as a re-read of an offset this sink
        already sealed), or a `Failure` for an unknown topic or a value that cannot
        be converted: that record is counted, and its offset still advances the
        offsets `flush()` returns.
        """
        tp = (record.topic, record.partition)
        if record.offset <= self._sealed.get(tp, -1):
            self.duplicates_skipped += 1
            return None
        result = rows_for(record, self.topics)
        if self._since is None:
            self._since = self._clock()
        by_offset = self._open.setdefault(tp, {})
        previous = by_offset.pop(record.offset, None)
        if previous:
            self._open_rows -= sum(len(r) for r in previous.values())
        if isinstance(result, Failure):
            self._rejected += 1
            self.rejected_total += 1
            by_offset[record.offset] = {}
            logger.warning(
                "analytics sink rejected %s[%d]@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                result,
            )
            return result
        by_offset[record.offset] = result
        self._open_rows += sum(len(r) for r in result.values())
        return None

    def buffered_rows(self) -> int:
        """Rows waiting: open ones and sealed ones not yet written."""
        return self._open_rows + sum(len(b.rows) for b in self._pending)

    def should_flush(self) -> bool:
        """True when `max_rows` rows wait, or something waits for `max_interval_s`.

        After a failed flush the interval restarts, which spaces out the retries.
        """
        if self.buffered_rows() >= self.max_rows:
            return True
        waiting = bool(self._open or self._pending)
        return (
            waiting
            and self._since is not None
            and self._clock() - self._since >= self.max_interval_s
        )

    def _seal(self) -> None:
        """Turn the open records into insert batches cut at aligned offset blocks."""
        for tp, by_offset in sorted(self._open.items()):
            topic, partition = tp
            blocks: dict[int, list[int]] = {}
            for offset in sorted(by_offset):
                blocks.setdefault(offset // self.offset_block, []).append(offset)
            for offsets in blocks.values():
                first, last = offsets[0], offsets[-1]
                tables: dict[str, list[tuple[Any, ...]]] = {}
                for offset in offsets:
                    for table, rows in by_offset[offset].items():
                        tables.setdefault(table, []).extend(rows)
                for table in TABLES:
                    if tables.get(table):
                        self._pending.append(
                            InsertBatch(table, topic, partition, first, last, tuple(tables[table]))
                        )
            high = max(by_offset)
            self._pending_offsets[tp] = max(high, self._pending_offsets.get(tp, -1))
            self._sealed[tp] = max(high, self._sealed.get(tp, -1))
        self._open.clear()
        self._open_rows = 0

    def flush(self) -> FlushResult:
        """Write everything buffered, one insert per sealed batch, in order.

        Returns the offsets now handled per (topic, partition) (inclusive; commit
        `offset + 1`). If an insert fails transiently (connection, timeout, a server
        problem that is not about the rows: `sink_rejections.rejection_code`), raises
        `SinkUnavailable` and keeps the failed batch and all after it (batches before
        it are written and are not sent again); nothing is acknowledged until a later
        flush writes them all, with the same tokens. If ClickHouse rejects the rows,
        the batch is replaced by its `split_rows()` parts, each with its own stable
        token, and the flush goes on; a single row still rejected is written to
        `sink_failures` instead (if that write fails, `SinkUnavailable`, the row kept).
        Raises `RuntimeError` before `setup()`.
        """
        client = self.client
        self._seal()
        rows: dict[str, int] = {}
        inserts = 0
        while self._pending:
            batch = self._pending[0]
            try:
                client.insert(
                    batch.table,
                    batch.rows,
                    column_names=COLUMNS[batch.table] + POSITION_COLUMNS,
                    settings={DEDUP_SETTING: batch.token},
                )
            except Exception as exc:
                message = _scrub(f"{type(exc).__name__}: {exc}", self._dsn)
                code = rejection_code(exc)
                if code is None:
                    raise self._unavailable(batch, message) from exc
                self._isolate(client, batch, code, message)
                continue
            self._pending.pop(0)
            rows[batch.table] = rows.get(batch.table, 0) + len(batch.rows)
            inserts += 1
        result = FlushResult(
            dict(self._pending_offsets),
            rows,
            inserts,
            self._rejected,
            self._splits,
            self._failed_rows,
        )
        self._pending_offsets.clear()
        self._rejected = self._splits = self._failed_rows = 0
        self._since = None
        return result

    def _unavailable(self, batch: InsertBatch, message: str) -> SinkUnavailable:
        self._since = self._clock()
        logger.warning(
            "analytics sink: insert into %s failed (%d batches kept): %s",
            batch.table,
            len(self._pending),
            message,
        )
        return SinkUnavailable(
            f"insert into {batch.table} at {self.dsn} failed; "
            f"{len(self._pending)} batches kept for retry: {message}"
        )

    def _isolate(
        self, client: AnalyticsClient, batch: InsertBatch, code: int, message: str
    ) -> None:
        """Replace the rejected `batch` (first pending) by its parts, or record its one row."""
        parts = split_rows(batch.rows, self.max_partitions_per_insert)
        if parts:
            logger.warning(
                "analytics sink: ClickHouse rejected %d rows for %s (code %d); inserting them "
                "in %d parts: %s",
                len(batch.rows),
                batch.table,
                code,
                len(parts),
                message[:300],
            )
            prefix = f"{batch.part}/" if batch.part else ""
            self._pending[0:1] = [
                replace(batch, rows=part_rows, part=prefix + label) for label, part_rows in parts
            ]
            self._splits += 1
            return
        columns = COLUMNS[batch.table] + POSITION_COLUMNS
        failure = failure_row(batch.table, columns, batch.rows[0], code, message, batch.token)
        try:
            client.insert(
                FAILURES_TABLE,
                [failure],
                column_names=FAILURE_COLUMNS,
                settings={DEDUP_SETTING: f"{FAILURES_TABLE}:{batch.token}"},
            )
        except Exception as exc:
            raise self._unavailable(
                batch,
                _scrub(f"recording a rejected row failed: {type(exc).__name__}: {exc}", self._dsn),
            ) from exc
        logger.error(
            "analytics sink: ClickHouse rejected a row for %s from %s[%d]@%d (code %d); "
            "recorded in %s: %s",
            batch.table,
            failure[7],
            failure[8],
            failure[9],
            code,
            FAILURES_TABLE,
            message[:300],
        )
        self._pending.pop(0)
        self._failed_rows += 1
        self.failed_rows_total += 1

    def close(self) -> None:
        """Close the client. Does not flush: unflushed rows were never acknowledged."""
        if self._client is not None:
            client, self._client = self._client, None
            client.close()


__all__ = [
    "COLUMNS",
    "DEDUP_SETTING",
    "MIGRATIONS_DIR",
    "AnalyticsClient",
    "AnalyticsSink",
    "FlushResult",
    "InsertBatch",
    "MigrationError",
    "SinkRecord",
    "SinkTopics",
    "SinkUnavailable",
    "apply_migrations",
    "load_migrations",
    "open_client",
    "redact_dsn",
    "rows_for",
    "split_sql",
]
