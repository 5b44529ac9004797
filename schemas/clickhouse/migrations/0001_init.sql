-- 0001_init: the analytics tables filled by processors/sink.py (AnalyticsSink).
--
-- A released migration is never edited (apply_migrations checks its checksum);
-- a change adds 0002_<name>.sql. Every statement is idempotent (IF NOT EXISTS).
--
-- Conventions shared by every table:
-- * event_time: when the event happened (UTC, ms). Tables are partitioned by its
--   month, and reports filter on it.
-- * source_topic / source_partition / source_offset: the Kafka position the sink
--   read the row's message from; kafka_time: that message's timestamp.
-- * version: the Kafka timestamp (ms) of that message. When two copies of one key
--   exist, the later message wins, both in background merges
--   (ReplacingMergeTree(version)) and in the reports
--   (ORDER BY version DESC LIMIT 1 BY <key>, exact before merges and across
--   partitions; see the module docstring of processors/sink.py).
-- * ORDER BY is the dedup key: the idempotency key of the input for derived
--   outputs (decisions, answers, attempts, tags), the source position for raw
--   inputs (pickups, listings), the original position for dead letters.
-- * non_replicated_deduplication_window: a retried insert that carries the same
--   insert_deduplication_token is dropped by the server.
-- * input_topic / input_partition / input_offset: the position of the input an
--   output was derived from ('' / -1 / -1 when the producer did not send it).

CREATE TABLE IF NOT EXISTS pickup_requests
(
    event_time         DateTime64(3, 'UTC') COMMENT 'occurred_at; the Kafka timestamp when it is 0',
    event_id           String,
    idempotency_key    String COMMENT 'records.idempotency_key(source_topic, event_id), the key its outputs carry',
    shippingid         String,
    uuid               String,
    previousuuid       String COMMENT 'uuid of an earlier verification of the shipment; empty if none',
    is_retake          Bool COMMENT 'previousuuid is set',
    productid          String,
    productname        String,
    question           String COMMENT 'the question JSON text as sent',
    vendor_images      Array(String),
    pickup_image_count UInt8,
    pickup_image_urls  Array(String) COMMENT 'the http(s) pickup images; base64 photos are not stored',
    source_topic       LowCardinality(String),
    source_partition   UInt32,
    source_offset      UInt64,
    kafka_time         DateTime64(3, 'UTC'),
    version            UInt64,
    ingested_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (source_topic, source_partition, source_offset)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS inference_attempts
(
    event_time        DateTime64(3, 'UTC') COMMENT 'when the attempt finished',
    idempotency_key   String,
    attempt           UInt8 COMMENT '1 for the first try, 2 for the stricter retry',
    request_uuid      String,
    shippingid        String,
    prompt_hash       String,
    raw_output        String,
    validation_status Enum8('valid' = 1, 'invalid' = 2),
    validation_error  String,
    model_version     LowCardinality(String),
    batch_id          String,
    batch_size        UInt16,
    gather_ms         Float64,
    model_ms          Float64,
    source_topic      LowCardinality(String),
    source_partition  UInt32,
    source_offset     UInt64,
    kafka_time        DateTime64(3, 'UTC'),
    version           UInt64,
    ingested_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (idempotency_key, attempt)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS verification_decisions
(
    event_time            DateTime64(3, 'UTC') COMMENT 'the decision timestamp',
    idempotency_key       String,
    shippingid            String,
    uuid                  String,
    product_id            String COMMENT 'empty when the request had none',
    ai_decision           Enum8('Pick' = 1, 'Not Pick' = 2),
    final_action          Enum8('Pick' = 1, 'Not Pick' = 2),
    ai_match_score        Float64,
    recommendation        LowCardinality(String),
    status                LowCardinality(String),
    status_code           UInt16,
    processing_time_ai    Float64 COMMENT 'seconds',
    total_time            Float64 COMMENT 'seconds',
    model_version         LowCardinality(String),
    question_count        UInt16,
    retake_question_count UInt16,
    retake_requested      Bool COMMENT 'at least one question has isRetakeImage = true',
    test_product_description      String,
    reference_product_description String,
    comparison            String,
    input_topic           LowCardinality(String),
    input_partition       Int32,
    input_offset          Int64,
    source_topic          LowCardinality(String),
    source_partition      UInt32,
    source_offset         UInt64,
    kafka_time            DateTime64(3, 'UTC'),
    version               UInt64,
    ingested_at           DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(event_time)
ORDER BY idempotency_key
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS question_answers
(
    event_time       DateTime64(3, 'UTC') COMMENT 'the decision timestamp',
    idempotency_key  String COMMENT 'of the decision',
    question_index   UInt16 COMMENT 'position in the request, from 0',
    uuid             String,
    shippingid       String,
    product_id       String,
    type             LowCardinality(String),
    label            LowCardinality(String),
    is_mandatory     Bool,
    value_to_check   String,
    answer           String,
    evidence         String,
    confidence       Float64 COMMENT '0-100',
    is_retake_image  Bool,
    ai_decision      Enum8('Pick' = 1, 'Not Pick' = 2) COMMENT 'of the decision',
    model_version    LowCardinality(String),
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    kafka_time       DateTime64(3, 'UTC'),
    version          UInt64,
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (idempotency_key, question_index)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS product_listings
(
    event_time       DateTime64(3, 'UTC') COMMENT 'occurred_at; the Kafka timestamp when it is 0',
    event_id         String,
    idempotency_key  String,
    product_id       String,
    title            String,
    description      String,
    has_image        Bool,
    image_url        String COMMENT 'the image when it is an http(s) URL; base64 images are not stored',
    top_k_tags       UInt8,
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    kafka_time       DateTime64(3, 'UTC'),
    version          UInt64,
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (source_topic, source_partition, source_offset)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS category_tags
(
    event_time       DateTime64(3, 'UTC') COMMENT 'the Kafka timestamp (the event carries no time)',
    idempotency_key  String,
    product_id       String,
    category         LowCardinality(String),
    score            Float64,
    top_categories   Array(LowCardinality(String)),
    top_probs        Array(Float64) COMMENT 'aligned with top_categories',
    tags             Array(String),
    used_text        Bool,
    used_image       Bool,
    model_version    LowCardinality(String),
    input_topic      LowCardinality(String),
    input_partition  Int32,
    input_offset     Int64,
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    kafka_time       DateTime64(3, 'UTC'),
    version          UInt64,
    ingested_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(event_time)
ORDER BY idempotency_key
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS dead_letters
(
    event_time         DateTime64(3, 'UTC') COMMENT 'failed_at',
    original_topic     LowCardinality(String),
    original_partition Int32,
    original_offset    Int64,
    original_key       String COMMENT 'raw bytes',
    original_value     String COMMENT 'raw bytes, whole',
    original_size      UInt32 COMMENT 'bytes in original_value',
    error_code         UInt16,
    error_name         LowCardinality(String),
    error_message      String,
    stage              LowCardinality(String),
    request_uuid       String,
    shippingid         String,
    extra              Map(String, String),
    source_topic       LowCardinality(String),
    source_partition   UInt32,
    source_offset      UInt64,
    kafka_time         DateTime64(3, 'UTC'),
    version            UInt64,
    ingested_at        DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(event_time)
ORDER BY (original_topic, original_partition, original_offset)
SETTINGS non_replicated_deduplication_window = 1000;
