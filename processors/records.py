"""Frozen records that flow between phases.

Field names of the event-facing records follow the existing HTTP service's
contract (docs/former-service.md, request and response) where the refund service and the pickup
app already depend on them; `to_event()` produces exactly the Avro record.

Every output carries `idempotency_key`, computed once per input by `input_key()`,
so that an input redelivered after a crash (at-least-once) yields outputs with the
same key and downstream consumers can collapse duplicates, while a new request for
the same shipment (a retake) gets a key of its own.
"""

from __future__ import annotations

import hashlib
import json
import uuid as uuid_module
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from processors.contracts import PICKUP_COMPLETED, PRODUCT_LISTED
from processors.errors import ErrorCode, ProcessingError

MAX_IMAGES_PER_KIND = 10
# Fields that do not identify a request's content: the ids themselves and the clock.
_NOT_CONTENT: Final = frozenset({"event_id", "uuid", "occurred_at"})


@dataclass(frozen=True, slots=True)
class SourcePosition:
    """Where an input came from: topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    def to_event(self) -> dict[str, Any]:
        """The `source` record of the output schemas."""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def content_hash(event: Mapping[str, Any]) -> str:
    """SHA-256 of every field of `event` except `event_id`, `uuid` and `occurred_at`.

    Empty values (None, "") count as absent, so a legacy JSON message and its Avro
    form, which fills in the defaults, hash alike.
    """
    content = {k: v for k, v in event.items() if k not in _NOT_CONTENT and v not in (None, "")}
    canonical = json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def input_key(contract: str, event: Mapping[str, Any]) -> str:
    """The idempotency key of one input event: the one rule, used by every output and table.

    It identifies the request, not the shipment: the producer's `event_id` when present,
    else the request `uuid` when the producer sent one, else a hash of the whole request
    content (`content_hash`: photos, `previousuuid` and every other field). `contract` is
    the schema's name (`PICKUP_COMPLETED`, `PRODUCT_LISTED`), never a configured topic
    name, so renaming topics keeps the keys. A redelivery of a message maps to the same
    key; a retake (new uuid or new photos) to a new one.
    """
    event_id = event.get("event_id")
    request_uuid = event.get("uuid")
    if isinstance(event_id, str) and event_id:
        identity = event_id
    elif isinstance(request_uuid, str) and request_uuid:
        identity = f"uuid:{request_uuid}"
    else:
        identity = f"content:{content_hash(event)}"
    return hashlib.sha256(f"{contract}\x00{identity}".encode()).hexdigest()[:32]


def _require_str(event: Mapping[str, Any], name: str, *, max_len: int = 10_000) -> str:
    value = event.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ProcessingError(ErrorCode.INVALID_EVENT, f"field {name!r} must be a non-empty string")
    if len(value) > max_len:
        raise ProcessingError(ErrorCode.INVALID_EVENT, f"field {name!r} is longer than {max_len}")
    return value


def _optional_str(event: Mapping[str, Any], name: str) -> str | None:
    value = event.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ProcessingError(ErrorCode.INVALID_EVENT, f"field {name!r} must be a string or null")
    return value


def _str_list(event: Mapping[str, Any], name: str, *, low: int, high: int) -> tuple[str, ...]:
    value = event.get(name)
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ProcessingError(ErrorCode.INVALID_EVENT, f"field {name!r} must be a list of strings")
    if not low <= len(value) <= high:
        raise ProcessingError(
            ErrorCode.INVALID_REQUEST, f"field {name!r} needs {low}-{high} items, got {len(value)}"
        )
    return tuple(value)


def _event_id(event: Mapping[str, Any], key: str) -> str:
    value = event.get("event_id")
    if isinstance(value, str) and value:
        return value
    # Legacy producers send no event id: the input's key stands in for it.
    return key


@dataclass(frozen=True, slots=True)
class PickupRequest:
    """A `pickup-completed` event: one reverse pickup to verify."""

    event_id: str
    occurred_at_ms: int
    shippingid: str
    uuid: str
    productname: str
    question: str
    pickupproductimage: tuple[str, ...]
    skupickdone: tuple[str, ...]
    productid: str | None = None
    previousuuid: str | None = None
    idempotency_key: str = ""
    """`input_key()` of the event; a request built directly is keyed by its `event_id`."""

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            key = input_key(PICKUP_COMPLETED, {"event_id": self.event_id})
            object.__setattr__(self, "idempotency_key", key)

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> PickupRequest:
        """Validate a decoded event; raises `ProcessingError` (INVALID_EVENT/INVALID_REQUEST)."""
        shippingid = _require_str(event, "shippingid", max_len=200)
        productname = _require_str(event, "productname", max_len=2_000)
        question = _require_str(event, "question", max_len=100_000)
        vendor = _str_list(event, "pickupproductimage", low=1, high=MAX_IMAGES_PER_KIND)
        pickup = _str_list(event, "skupickdone", low=1, high=MAX_IMAGES_PER_KIND)
        key = input_key(PICKUP_COMPLETED, event)
        event_id = _event_id(event, key)
        request_uuid = _optional_str(event, "uuid") or str(
            uuid_module.uuid5(uuid_module.NAMESPACE_URL, f"visionstream:{event_id}")
        )
        occurred = event.get("occurred_at", 0)
        return cls(
            event_id=event_id,
            occurred_at_ms=int(occurred) if isinstance(occurred, int | float) else 0,
            shippingid=shippingid,
            uuid=request_uuid,
            productname=productname,
            question=question,
            pickupproductimage=vendor,
            skupickdone=pickup,
            productid=_optional_str(event, "productid"),
            previousuuid=_optional_str(event, "previousuuid"),
            idempotency_key=key,
        )

    def to_event(self) -> dict[str, Any]:
        """The request as a `pickup-completed` event (the shape `from_event` reads)."""
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at_ms,
            "pickupproductimage": list(self.pickupproductimage),
            "skupickdone": list(self.skupickdone),
            "productname": self.productname,
            "question": self.question,
            "shippingid": self.shippingid,
            "productid": self.productid,
            "uuid": self.uuid,
            "previousuuid": self.previousuuid,
        }


@dataclass(frozen=True, slots=True)
class ProductListing:
    """A `product-listed` event: one new listing to categorize."""

    event_id: str
    occurred_at_ms: int
    product_id: str
    title: str
    description: str
    image: str | None
    top_k_tags: int = 5
    idempotency_key: str = ""
    """`input_key()` of the event; a listing built directly is keyed by its `event_id`."""

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            key = input_key(PRODUCT_LISTED, {"event_id": self.event_id})
            object.__setattr__(self, "idempotency_key", key)

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> ProductListing:
        """Validate a decoded event; raises `ProcessingError` (INVALID_EVENT)."""
        product_id = _require_str(event, "product_id", max_len=200)
        title = event.get("title") or ""
        description = event.get("description") or ""
        if not isinstance(title, str) or not isinstance(description, str):
            raise ProcessingError(ErrorCode.INVALID_EVENT, "title and description must be strings")
        top_k = event.get("top_k_tags", 5)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= 50:
            raise ProcessingError(ErrorCode.INVALID_EVENT, "top_k_tags must be an integer 0-50")
        occurred = event.get("occurred_at", 0)
        key = input_key(PRODUCT_LISTED, event)
        return cls(
            event_id=_event_id(event, key),
            occurred_at_ms=int(occurred) if isinstance(occurred, int | float) else 0,
            product_id=product_id,
            title=title,
            description=description,
            image=_optional_str(event, "image"),
            top_k_tags=top_k,
            idempotency_key=key,
        )

    def to_event(self) -> dict[str, Any]:
        """The listing as a `product-listed` event (the shape `from_event` reads)."""
        return {
            "event_id": self.event_id,
            "occurred_at": self.occurred_at_ms,
            "product_id": self.product_id,
            "title": self.title,
            "description": self.description,
            "image": self.image,
            "top_k_tags": self.top_k_tags,
        }


@dataclass(frozen=True, slots=True)
class QuestionAnswer:
    """One answered verification question, as the refund service reads it."""

    type: str
    label: str
    is_mandatory: str
    value_to_check: str
    answer: str
    evidence: str
    confidence: float
    is_retake_image: str

    def to_event(self) -> dict[str, Any]:
        """The answer as one `Question` item of a `verification-decision` event."""
        return {
            "Type": self.type,
            "Label": self.label,
            "IsMandatory": self.is_mandatory,
            "ValueToCheck": self.value_to_check,
            "answer": self.answer,
            "Evidence": self.evidence,
            "Confidence": self.confidence,
            "isRetakeImage": self.is_retake_image,
        }


@dataclass(frozen=True, slots=True)
class Analysis:
    """The model's free-text image analysis."""

    test_product_description: str = ""
    reference_product_description: str = ""
    comparison: str = ""

    def to_event(self) -> dict[str, Any]:
        """The analysis as the `analysis` record of a `verification-decision` event."""
        return {
            "test_product_description": self.test_product_description,
            "reference_product_description": self.reference_product_description,
            "comparison": self.comparison,
        }


@dataclass(frozen=True, slots=True)
class VerificationDecision:
    """The decision for one pickup (docs/former-service.md, "Response")."""

    shippingid: str
    uuid: str
    product_id: str | None
    questions: tuple[QuestionAnswer, ...]
    ai_decision: str
    final_action: str
    ai_match_score: float
    analysis: Analysis
    status: str
    status_code: int
    processing_time_ai: float
    total_time: float
    timestamp: str
    model_version: str
    recommendation: str
    idempotency_key: str
    source: SourcePosition | None = None

    def to_event(self) -> dict[str, Any]:
        """The decision as a `verification-decision` event."""
        return {
            "shippingid": self.shippingid,
            "uuid": self.uuid,
            "product_id": self.product_id,
            "processing_time_ai": self.processing_time_ai,
            "Question": [q.to_event() for q in self.questions],
            "ai_decision": self.ai_decision,
            "finalAction": self.final_action,
            "ai_match_score": self.ai_match_score,
            "analysis": self.analysis.to_event(),
            "status": self.status,
            "StatusCode": self.status_code,
            "total_time": self.total_time,
            "timestamp": self.timestamp,
            "recommendation": self.recommendation,
            "model_version": self.model_version,
            "idempotency_key": self.idempotency_key,
            "source": self.source.to_event() if self.source else None,
        }


@dataclass(frozen=True, slots=True)
class VerificationAttempt:
    """One model attempt for one request (first try or the stricter retry)."""

    request_uuid: str
    shippingid: str
    attempt: int
    prompt_hash: str
    raw_output: str
    validation_status: str  # "valid" or "invalid"
    validation_error: str
    model_version: str
    batch_id: str
    batch_size: int
    gather_ms: float
    model_ms: float
    idempotency_key: str
    occurred_at_ms: int

    def to_event(self) -> dict[str, Any]:
        """The attempt as a `verification-attempts` event."""
        return {
            "request_uuid": self.request_uuid,
            "shippingid": self.shippingid,
            "attempt": self.attempt,
            "prompt_hash": self.prompt_hash,
            "raw_output": self.raw_output,
            "validation_status": self.validation_status,
            "validation_error": self.validation_error,
            "model_version": self.model_version,
            "batch_id": self.batch_id,
            "batch_size": self.batch_size,
            "gather_ms": self.gather_ms,
            "model_ms": self.model_ms,
            "idempotency_key": self.idempotency_key,
            "occurred_at": self.occurred_at_ms,
        }


@dataclass(frozen=True, slots=True)
class TopCategory:
    """One of a tag's best categories with its probability."""

    category: str
    prob: float


@dataclass(frozen=True, slots=True)
class CategoryTag:
    """The categorization of one listing (the former categorization response plus identity)."""

    product_id: str
    category: str
    score: float
    top_categories: tuple[TopCategory, ...]
    tags: tuple[str, ...]
    model_version: str
    idempotency_key: str
    used_text: bool = True
    used_image: bool = True
    source: SourcePosition | None = None

    def to_event(self) -> dict[str, Any]:
        """The tag as a `category-tag` event."""
        return {
            "product_id": self.product_id,
            "category": self.category,
            "score": self.score,
            "top_categories": [
                {"category": c.category, "prob": c.prob} for c in self.top_categories
            ],
            "tags": list(self.tags),
            "used_text": self.used_text,
            "used_image": self.used_image,
            "model_version": self.model_version,
            "idempotency_key": self.idempotency_key,
            "source": self.source.to_event() if self.source else None,
        }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input that could not be processed, kept whole with the reason."""

    original_value: bytes
    original_key: bytes | None
    source: SourcePosition
    error_code: int
    error_name: str
    error_message: str
    stage: str
    failed_at_ms: int
    request_uuid: str | None = None
    shippingid: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_event(self) -> dict[str, Any]:
        """The letter as a `dead-letter` event."""
        return {
            "original_value": self.original_value,
            "original_key": self.original_key,
            "source_topic": self.source.topic,
            "source_partition": self.source.partition,
            "source_offset": self.source.offset,
            "error_code": self.error_code,
            "error_name": self.error_name,
            "error_message": self.error_message,
            "stage": self.stage,
            "failed_at": self.failed_at_ms,
            "request_uuid": self.request_uuid,
            "shippingid": self.shippingid,
            "extra": dict(self.extra),
        }
