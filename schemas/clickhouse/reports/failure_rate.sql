-- Model JSON failures per UTC day.
-- Columns: day; requests (distinct inputs with at least one inference attempt);
-- attempts; invalid_attempts (validation_status = 'invalid');
-- invalid_attempt_rate = invalid_attempts / attempts;
-- model_output_failures (dead letters with error_code 1301 MODEL_OUTPUT_INVALID:
-- both attempts invalid); failure_rate = model_output_failures / requests.
-- Each attempt counts once per (idempotency_key, attempt), each dead letter once
-- per original position; the day is the attempt's or the dead letter's time.
SELECT
    day,
    sum(n_requests) AS requests,
    sum(n_attempts) AS attempts,
    sum(n_invalid) AS invalid_attempts,
    if(attempts = 0, 0, invalid_attempts / attempts) AS invalid_attempt_rate,
    sum(n_failures) AS model_output_failures,
    if(requests = 0, 0, model_output_failures / requests) AS failure_rate
FROM
(
    SELECT
        toDate(event_time) AS day,
        uniqExact(idempotency_key) AS n_requests,
        count() AS n_attempts,
        countIf(validation_status = 'invalid') AS n_invalid,
        toUInt64(0) AS n_failures
    FROM
    (
        SELECT event_time, idempotency_key, validation_status
        FROM inference_attempts
        WHERE event_time >= {since:DateTime64(3, 'UTC')}
        ORDER BY version DESC
        LIMIT 1 BY idempotency_key, attempt
    )
    GROUP BY day

    UNION ALL

    SELECT
        toDate(event_time) AS day,
        toUInt64(0) AS n_requests,
        toUInt64(0) AS n_attempts,
        toUInt64(0) AS n_invalid,
        count() AS n_failures
    FROM
    (
        SELECT event_time
        FROM dead_letters
        WHERE event_time >= {since:DateTime64(3, 'UTC')} AND error_code = 1301
        ORDER BY version DESC
        LIMIT 1 BY original_topic, original_partition, original_offset
    )
    GROUP BY day
)
GROUP BY day
ORDER BY day
