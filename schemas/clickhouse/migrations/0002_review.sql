-- 0002_review: the review loop (docs/review.md). Verdicts from the review page
-- (topic verification-review) and the review copies of the images the model saw
-- (topic review-image), filled by processors/sink.py through processors/review/rows.py.
--
-- Conventions of 0001_init apply (event_time, source_*, kafka_time, version,
-- non_replicated_deduplication_window). Differences:
-- * reviews / review_answers are keyed by the review TARGET (the decision's
--   idempotency key), and their ReplacingMergeTree version is reviewed_ms, the time
--   of the verdict: a later verdict on the same decision supersedes an earlier one,
--   and a re-sent verdict (same review_id, same reviewed_ms) collapses. Reports read
--   ORDER BY reviewed_ms DESC, version DESC LIMIT 1 BY decision_key.
-- * review_images is content-addressed (ORDER BY sha256): a vendor image shared by
--   many returns is stored once. Rows expire after the retention the sink sets at
--   start (VS_REVIEW_RETENTION_DAYS, 30 by default: ALTER TABLE ... MODIFY TTL);
--   the 30 days below are the value before the sink first runs.

CREATE TABLE IF NOT EXISTS reviews
(
    event_time        DateTime64(3, 'UTC') COMMENT 'reviewed_at',
    review_id         String COMMENT 'the verdict''s idempotency key',
    decision_key      String COMMENT 'idempotency_key of the reviewed decision',
    request_uuid      String,
    shippingid        String,
    product_id        String,
    model_version     LowCardinality(String),
    ai_decision       Enum8('Pick' = 1, 'Not Pick' = 2),
    reviewer_decision Enum8('Pick' = 1, 'Not Pick' = 2),
    agrees            Bool,
    answers_marked    UInt16,
    answers_wrong     UInt16,
    reviewer          String,
    note              String,
    reviewed_ms       UInt64 COMMENT 'reviewed_at in ms: the version, the later verdict wins',
    source_topic      LowCardinality(String),
    source_partition  UInt32,
    source_offset     UInt64,
    kafka_time        DateTime64(3, 'UTC'),
    version           UInt64,
    ingested_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(reviewed_ms)
PARTITION BY toYYYYMM(event_time)
ORDER BY decision_key
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS review_answers
(
    event_time       DateTime64(3, 'UTC') COMMENT 'reviewed_at',
    review_id        String,
    decision_key     String,
    question_index   UInt16,
    type             LowCardinality(String),
    label            LowCardinality(String),
    correct          Bool COMMENT 'the reviewer marked the model''s answer correct',
    product_id       String,
    model_version    LowCardinality(String),
    reviewer         String,
    reviewed_ms      UInt64,
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    kafka_time       DateTime64(3, 'UTC'),
    version          UInt64,
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(reviewed_ms)
PARTITION BY toYYYYMM(event_time)
ORDER BY (decision_key, question_index)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS review_images
(
    event_time       DateTime64(3, 'UTC') COMMENT 'created_at of the copy; retention counts from it',
    sha256           String COMMENT 'hex SHA-256 of jpeg',
    jpeg             String COMMENT 'the review copy, JPEG bytes, at most 512 px on the long side',
    width            UInt16,
    height           UInt16,
    size_bytes       UInt32,
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    kafka_time       DateTime64(3, 'UTC'),
    version          UInt64,
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY sha256
TTL toDateTime(event_time) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS review_image_refs
(
    event_time       DateTime64(3, 'UTC') COMMENT 'created_at of the copy',
    request_uuid     String,
    decision_key     String,
    role             LowCardinality(String) COMMENT 'vendor or pickup',
    image_index      UInt16,
    sha256           String,
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    kafka_time       DateTime64(3, 'UTC'),
    version          UInt64,
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (request_uuid, role, image_index)
TTL toDateTime(event_time) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000;
