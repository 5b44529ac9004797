"""chDB fixtures and event builders shared by the review tests.

The chDB engine directory is the suite's one (see tests/processors/analytics/test_sink.py).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from processors.analytics.rows import COLUMNS, SinkRecord
from processors.analytics.sink import AnalyticsSink
from processors.review.verdicts import AnswerMark, Verdict

T0 = 1_714_557_600_000  # 2024-05-01T10:00:00Z


@pytest.fixture
def ch(module_client: Any) -> Any:
    """The module's client over emptied tables, merges stopped (raw copies stay countable)."""
    module_client.command("SYSTEM STOP MERGES")
    for table in COLUMNS:
        module_client.command(f"TRUNCATE TABLE {table}")
    return module_client


@pytest.fixture
def sinks() -> Iterator[list[AnalyticsSink]]:
    made: list[AnalyticsSink] = []
    yield made
    for sink in made:
        sink.close()


def new_sink(sinks: list[AnalyticsSink], dsn: str, **kwargs: Any) -> AnalyticsSink:
    sink = AnalyticsSink(dsn, **kwargs)
    sink.setup()
    sinks.append(sink)
    return sink


def verdict(
    target: str,
    *,
    review_id: str = "a1" * 16,
    ai: str = "Pick",
    reviewer_decision: str = "Pick",
    at_ms: int = T0,
    marks: tuple[tuple[int, bool], ...] = ((0, True), (1, False)),
    product_id: str = "P1",
    model_version: str = "internvl-1",
) -> dict[str, Any]:
    labels = ("Color", "Brand", "Size")
    return Verdict(
        review_id=review_id,
        decision_key=target,
        request_uuid=f"u-{target}",
        shippingid=f"S-{target}",
        product_id=product_id,
        model_version=model_version,
        ai_decision=ai,
        reviewer_decision=reviewer_decision,
        answers=tuple(AnswerMark(i, "text", labels[i % 3], ok) for i, ok in marks),
        note="checked",
        reviewer="alice",
        reviewed_at=datetime.fromtimestamp(at_ms / 1000, UTC),
    ).to_event()


def jpeg(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def image_event(
    data: bytes,
    *,
    request_uuid: str = "u-1",
    role: str = "pickup",
    index: int = 0,
    created_at_ms: int | None = None,
) -> dict[str, Any]:
    """A review-image event; made now by default (copies older than the retention expire)."""
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "jpeg": data,
        "width": 40,
        "height": 30,
        "request_uuid": request_uuid,
        "decision_key": f"k-{request_uuid}",
        "role": role,
        "image_index": index,
        "created_at": created_at_ms or int(time.time() * 1000),
    }


def rec(topic: str, offset: int, value: dict[str, Any], partition: int = 0) -> SinkRecord:
    return SinkRecord(topic, partition, offset, value, T0 + offset)
