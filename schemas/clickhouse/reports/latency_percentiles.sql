-- Latency percentiles of verification decisions, in seconds, per model version:
-- total_time (start of the batch to the decision) and processing_time_ai (the
-- request's share of model inference). Exact percentiles with linear
-- interpolation (quantileExactInclusive, like numpy.percentile's default).
-- Columns: model_version, decisions, p50/p95/p99_total_time,
-- p50/p95/p99_processing_time_ai.
-- Each input counts once: the latest copy per idempotency_key.
SELECT
    model_version,
    count() AS decisions,
    quantileExactInclusive(0.50)(total_time) AS p50_total_time,
    quantileExactInclusive(0.95)(total_time) AS p95_total_time,
    quantileExactInclusive(0.99)(total_time) AS p99_total_time,
    quantileExactInclusive(0.50)(processing_time_ai) AS p50_processing_time_ai,
    quantileExactInclusive(0.95)(processing_time_ai) AS p95_processing_time_ai,
    quantileExactInclusive(0.99)(processing_time_ai) AS p99_processing_time_ai
FROM
(
    SELECT model_version, total_time, processing_time_ai
    FROM verification_decisions
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY version DESC
    LIMIT 1 BY idempotency_key
)
GROUP BY model_version
ORDER BY model_version
