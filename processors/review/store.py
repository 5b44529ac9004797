"""Reads for the review page, and the upkeep of the stored review copies.

Every read takes the latest copy of each key, as the reports do (`ORDER BY version
DESC LIMIT 1 BY <key>`, see processors/analytics/sink.py), and binds every value server-side
(`{name:Type}` parameters, never string formatting): the optional filters of the
queue only switch fixed SQL clauses on or off.

Failures: client errors propagate (the web layer answers 503); `decision()` returns
None for an unknown key and `image()` None for an unknown or expired copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from processors.analytics.client import AnalyticsClient

PAGE_SIZE = 25
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

DECISIONS = """
    SELECT idempotency_key, event_time, shippingid, uuid, product_id,
           toString(ai_decision) AS ai_decision, recommendation, retake_requested,
           ai_match_score, model_version, status_code, processing_time_ai, total_time,
           test_product_description, reference_product_description, comparison
    FROM verification_decisions
    WHERE event_time >= {start:DateTime64(3, 'UTC')} AND event_time < {end:DateTime64(3, 'UTC')}
    ORDER BY version DESC
    LIMIT 1 BY idempotency_key
"""
MIN_CONFIDENCE = """
    SELECT idempotency_key, min(confidence) AS min_confidence
    FROM
    (
        SELECT idempotency_key, question_index, confidence FROM question_answers
        WHERE event_time >= {start:DateTime64(3, 'UTC')} AND event_time < {end:DateTime64(3, 'UTC')}
        ORDER BY version DESC LIMIT 1 BY idempotency_key, question_index
    )
    GROUP BY idempotency_key
"""
PRODUCT_NAMES = """
    SELECT idempotency_key, productname, previousuuid FROM pickup_requests
    ORDER BY version DESC LIMIT 1 BY idempotency_key
"""
LATEST_REVIEWS = """
    SELECT decision_key AS idempotency_key, toString(reviewer_decision) AS reviewed_as,
           reviewer AS reviewed_by
    FROM reviews ORDER BY reviewed_ms DESC, version DESC LIMIT 1 BY decision_key
"""
# Optional filters: each clause is fixed text; only its bound value comes from the user.
_FILTERS = {
    "decision": "d.ai_decision = {decision:String}",
    "recommendation": "d.recommendation = {recommendation:String}",
    "retake": "d.retake_requested = {retake:Bool}",
    "below": "a.min_confidence < {below:Float64}",
    "product": "(d.product_id = {product:String} OR positionCaseInsensitiveUTF8(p.productname, {product:String}) > 0)",
    "reviewed": "(r.reviewed_as != '') = {reviewed:Bool}",
}


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """What the queue shows; every field optional. `start`/`end` are UTC dates, end inclusive."""

    decision: str = ""
    recommendation: str = ""
    retake: bool | None = None
    below: float | None = None
    product: str = ""
    reviewed: bool | None = None
    start: date | None = None
    end: date | None = None
    failures: bool = False
    page: int = 1

    def window(self, today: date) -> tuple[datetime, datetime]:
        """The filter's days as a UTC [start, end) range.

        `end` is the midnight after `self.end` (default: `today`); `start` defaults to
        ten years before it.
        """
        end = (self.end or today) + timedelta(days=1)
        start = self.start or end - timedelta(days=3650)
        return _midnight_utc(start), _midnight_utc(end)

    def bound(self) -> dict[str, Any]:
        """The set filters, by parameter name."""
        values: dict[str, Any] = {
            "decision": self.decision,
            "recommendation": self.recommendation,
            "retake": self.retake,
            "below": self.below,
            "product": self.product,
            "reviewed": self.reviewed,
        }
        return {k: v for k, v in values.items() if v not in ("", None)}


@dataclass(frozen=True, slots=True)
class Page:
    """One page of the queue: rows as dicts, and whether there is a next page."""

    rows: list[dict[str, Any]]
    page: int
    has_next: bool


@dataclass(frozen=True, slots=True)
class DecisionDetail:
    """Everything the decision page shows about one decision."""

    decision: dict[str, Any]
    answers: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    images: dict[str, list[dict[str, Any]]]
    earlier: list[dict[str, Any]] = field(default_factory=list)
    later: list[dict[str, Any]] = field(default_factory=list)
    review: dict[str, Any] | None = None
    productname: str = ""


def _dicts(client: AnalyticsClient, sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
    result = client.query(sql, parameters=parameters)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


class ReviewStore:
    """The review page's reads over one ClickHouse client (chDB or a server)."""

    def __init__(self, client: AnalyticsClient) -> None:
        self._client = client

    @property
    def client(self) -> AnalyticsClient:
        """The client the reads use (the accuracy page runs its reports on it)."""
        return self._client

    def queue(self, wanted: QueueFilter, *, today: date | None = None) -> Page:
        """Decisions (or, with `failures`, dead-lettered pickups), newest first, one page."""
        start, end = wanted.window(today or datetime.now(UTC).date())
        page = max(1, wanted.page)
        params: dict[str, Any] = {
            "start": start,
            "end": end,
            "limit": PAGE_SIZE + 1,
            "offset": (page - 1) * PAGE_SIZE,
        }
        if wanted.failures:
            rows = self._failures(params, wanted.product)
        else:
            bound = wanted.bound()
            where = " AND ".join(_FILTERS[name] for name in bound) or "1"
            sql = f"""
                SELECT d.* EXCEPT (idempotency_key), d.idempotency_key AS idempotency_key,
                       a.min_confidence AS min_confidence, p.productname AS productname,
                       r.reviewed_as AS reviewed_as, r.reviewed_by AS reviewed_by
                FROM ({DECISIONS}) AS d
                LEFT JOIN ({MIN_CONFIDENCE}) AS a ON a.idempotency_key = d.idempotency_key
                LEFT JOIN ({PRODUCT_NAMES}) AS p ON p.idempotency_key = d.idempotency_key
                LEFT JOIN ({LATEST_REVIEWS}) AS r ON r.idempotency_key = d.idempotency_key
                WHERE {where}
                ORDER BY d.event_time DESC, d.idempotency_key
                LIMIT {{limit:UInt32}} OFFSET {{offset:UInt32}}
            """  # noqa: S608 - fixed clauses; every value is a bound parameter
            rows = _dicts(self._client, sql, {**params, **bound})
        return Page(rows[:PAGE_SIZE], page, len(rows) > PAGE_SIZE)

    def _failures(self, params: dict[str, Any], product: str) -> list[dict[str, Any]]:
        where = "1"
        if product:
            where = "positionCaseInsensitiveUTF8(original_value, {product:String}) > 0"
            params = {**params, "product": product}
        sql = f"""
            SELECT event_time, shippingid, request_uuid, error_code, error_name, error_message,
                   stage, extra, original_topic, original_partition, original_offset
            FROM
            (
                SELECT * FROM dead_letters
                WHERE event_time >= {{start:DateTime64(3, 'UTC')}}
                  AND event_time < {{end:DateTime64(3, 'UTC')}}
                ORDER BY version DESC
                LIMIT 1 BY original_topic, original_partition, original_offset
            )
            WHERE {where}
            ORDER BY event_time DESC, original_offset DESC
            LIMIT {{limit:UInt32}} OFFSET {{offset:UInt32}}
        """  # noqa: S608 - fixed clauses; every value is a bound parameter
        rows = _dicts(self._client, sql, params)
        for row in rows:  # the review copies of what the model saw, when it got that far
            row["images"] = self._images(str(row["request_uuid"])) if row["request_uuid"] else {}
        return rows

    def decision(self, key: str) -> DecisionDetail | None:
        """One decision with its answers, attempts, review copies, retake chain and review."""
        params: dict[str, Any] = {
            "key": key,
            "start": datetime(1970, 1, 1, tzinfo=UTC),
            "end": datetime(2299, 1, 1, tzinfo=UTC),
        }
        found = _dicts(
            self._client,
            f"SELECT * FROM ({DECISIONS}) WHERE idempotency_key = {{key:String}}",  # noqa: S608
            params,
        )
        if not found:
            return None
        decision = found[0]
        answers = _dicts(
            self._client,
            """SELECT question_index, type, label, is_mandatory, value_to_check, answer, evidence,
                      confidence, is_retake_image
               FROM question_answers WHERE idempotency_key = {key:String}
               ORDER BY version DESC LIMIT 1 BY question_index""",
            params,
        )
        answers.sort(key=lambda a: a["question_index"])
        attempts = _dicts(
            self._client,
            """SELECT attempt, validation_status, validation_error, raw_output, model_version,
                      batch_size, gather_ms, model_ms
               FROM inference_attempts WHERE idempotency_key = {key:String}
               ORDER BY version DESC LIMIT 1 BY attempt""",
            params,
        )
        attempts.sort(key=lambda a: a["attempt"])
        request = _dicts(
            self._client,
            """SELECT productname, previousuuid FROM pickup_requests
               WHERE idempotency_key = {key:String} ORDER BY version DESC LIMIT 1""",
            params,
        )
        productname = request[0]["productname"] if request else ""
        previous = request[0]["previousuuid"] if request else ""
        return DecisionDetail(
            decision=decision,
            answers=answers,
            attempts=attempts,
            images=self._images(str(decision["uuid"])),
            earlier=self._by_uuids([previous]) if previous else [],
            later=self._retakes_of(str(decision["uuid"])),
            review=self.latest_review(key),
            productname=productname,
        )

    def _images(self, request_uuid: str) -> dict[str, list[dict[str, Any]]]:
        refs = _dicts(
            self._client,
            """SELECT role, image_index, sha256, width, height
               FROM (SELECT role, image_index, sha256 FROM review_image_refs
                     WHERE request_uuid = {uuid:String}
                     ORDER BY version DESC LIMIT 1 BY role, image_index) AS r
               INNER JOIN (SELECT sha256, width, height FROM review_images
                           WHERE sha256 IN (SELECT sha256 FROM review_image_refs
                                            WHERE request_uuid = {uuid:String})
                           ORDER BY version DESC LIMIT 1 BY sha256) AS i USING sha256
               ORDER BY role, image_index""",
            {"uuid": request_uuid},
        )
        return {role: [r for r in refs if r["role"] == role] for role in ("vendor", "pickup")}

    def _by_uuids(self, uuids: list[str]) -> list[dict[str, Any]]:
        return _dicts(
            self._client,
            """SELECT uuid, idempotency_key, toString(ai_decision) AS ai_decision, event_time
               FROM verification_decisions WHERE uuid IN {uuids:Array(String)}
               ORDER BY version DESC LIMIT 1 BY idempotency_key""",
            {"uuids": uuids},
        )

    def _retakes_of(self, request_uuid: str) -> list[dict[str, Any]]:
        later = _dicts(
            self._client,
            """SELECT DISTINCT uuid FROM pickup_requests WHERE previousuuid = {uuid:String}""",
            {"uuid": request_uuid},
        )
        return self._by_uuids([r["uuid"] for r in later]) if later else []

    def latest_review(self, key: str) -> dict[str, Any] | None:
        """The newest review of a decision (its latest version), or None when unreviewed."""
        reviews = _dicts(
            self._client,
            """SELECT review_id, toString(reviewer_decision) AS reviewer_decision, agrees,
                      reviewer, note, event_time
               FROM reviews WHERE decision_key = {key:String}
               ORDER BY reviewed_ms DESC, version DESC LIMIT 1""",
            {"key": key},
        )
        return reviews[0] if reviews else None

    def image(self, sha256: str) -> bytes | None:
        """The stored review copy with that address, or None (unknown, expired, malformed)."""
        if not _SHA256.match(sha256):
            return None
        found = self._client.query(
            "SELECT hex(jpeg) FROM review_images WHERE sha256 = {sha:String} LIMIT 1",
            parameters={"sha": sha256},
        ).result_rows
        return bytes.fromhex(found[0][0]) if found else None


def _midnight_utc(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def apply_retention(client: AnalyticsClient, days: int) -> None:
    """Set the TTL of the review copies to `days` (idempotent; run by the sink at start)."""
    if not 1 <= days <= 36500:
        raise ValueError(f"retention must be 1..36500 days, got {days}")
    for table in ("review_images", "review_image_refs"):
        client.command(
            f"ALTER TABLE {table} MODIFY TTL toDateTime(event_time) + INTERVAL {int(days)} DAY"
        )


def enforce_budget(client: AnalyticsClient, max_bytes: int) -> int:
    """Delete the oldest review copies until the stored ones fit `max_bytes`; bytes deleted.

    Copies are counted once per sha256 (the latest row); the newest are kept. The
    references to deleted copies stay (the page shows them as expired).
    """
    rows = client.query(
        """SELECT sha256, size_bytes FROM
           (SELECT sha256, size_bytes, event_time FROM review_images
            ORDER BY version DESC LIMIT 1 BY sha256)
           ORDER BY event_time DESC, sha256"""
    ).result_rows
    total, doomed, freed = 0, [], 0
    for digest, size in rows:
        total += int(size)
        if total > max_bytes:
            doomed.append(str(digest))
            freed += int(size)
    for start in range(0, len(doomed), 1000):
        client.command(
            "ALTER TABLE review_images DELETE WHERE sha256 IN {doomed:Array(String)}",
            parameters={"doomed": doomed[start : start + 1000]},
            settings={"mutations_sync": 1},
        )
    return freed
