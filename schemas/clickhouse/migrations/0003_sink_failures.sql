-- 0003_sink_failures: rows ClickHouse refused even when inserted alone
-- (processors/sink.py, processors/sink_rejections.py).
--
-- When an insert is rejected for its content, the sink splits the block (by month
-- partition, then by halves down to one row); a single row still rejected is
-- recorded here, with the error and where it came from, and the sink moves on. The
-- original message stays in Kafka at source_topic/source_partition/source_offset for
-- its retention, so a fixed row can be re-read from there.
--
-- * No partition key: one partition, so a backfill of failures can never break the
--   partitions-per-insert limit itself, and FINAL always collapses.
-- * ORDER BY is the row's position: the Kafka position of its message, the table it
--   was meant for and the insert token of its one-row insert (equal for the same
--   row on a re-read), so a row recorded twice collapses. failed_at is the version:
--   the latest failure wins.

CREATE TABLE IF NOT EXISTS sink_failures
(
    failed_at        DateTime64(3, 'UTC') COMMENT 'when the sink gave up on the row',
    target_table     LowCardinality(String) COMMENT 'the table that refused the row',
    error_code       UInt32 COMMENT 'the ClickHouse error code; 0 when the client refused it',
    error_message    String COMMENT 'the error, at most 4 KiB, passwords removed',
    row_json         String COMMENT 'the row as a JSON object, column -> value, at most 64 KiB',
    row_size         UInt32 COMMENT 'length of the full JSON text',
    insert_token     String COMMENT 'insert_deduplication_token of the one-row insert',
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    kafka_time       DateTime64(3, 'UTC'),
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(failed_at)
ORDER BY (source_topic, source_partition, source_offset, target_table, insert_token)
SETTINGS non_replicated_deduplication_window = 1000;
