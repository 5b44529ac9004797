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
handled (see `rejections.py`).

The rest of the package: `client.py` (one DSN for the embedded chDB engine or a
server), `migrations.py`, and `rows.py` (what each record becomes; topics map to
contracts through `processors.contracts.Topics`).

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
from typing import Any

from processors.analytics.client import (
    DEDUP_SETTING,
    AnalyticsClient,
    SinkUnavailable,
    open_client,
    redact_dsn,
    scrub_secrets,
)
from processors.analytics.migrations import MigrationError, apply_migrations
from processors.analytics.rejections import (
    DEFAULT_MAX_PARTITIONS_PER_INSERT,
    FAILURE_COLUMNS,
    FAILURES_TABLE,
    failure_row,
    rejection_code,
    split_rows,
)
from processors.analytics.rows import COLUMNS, POSITION_COLUMNS, TABLES, SinkRecord, rows_for
from processors.analytics.values import Rows
from processors.contracts import DEFAULT_TOPICS, Topics
from processors.errors import Failure

logger = logging.getLogger(__name__)


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


class AnalyticsSink:
    """Buffers decoded events from the `Topics` topics and writes them to ClickHouse.

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
        topics: Topics = DEFAULT_TOPICS,
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
            message = scrub_secrets(f"{type(exc).__name__}: {exc}", self._dsn)
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
        problem that is not about the rows: `rejections.rejection_code`), raises
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
                message = scrub_secrets(f"{type(exc).__name__}: {exc}", self._dsn)
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
                scrub_secrets(
                    f"recording a rejected row failed: {type(exc).__name__}: {exc}", self._dsn
                ),
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


__all__ = ["AnalyticsSink", "FlushResult", "InsertBatch"]
