-- Model JSON failures per product: failure_rate's numbers grouped by the product of
-- the pickup request (its productid, else its productname; '(unknown)' when the
-- pickup-completed event is not in the pickup_requests table).
-- Columns: product, requests, attempts, invalid_attempts, invalid_attempt_rate,
-- model_output_failures (dead letters 1301), failure_rate.
-- Attempts and dead letters join pickups on uuid = request_uuid.
WITH products AS
(
    SELECT uuid, if(productid != '', productid, productname) AS product
    FROM pickup_requests
    ORDER BY version DESC
    LIMIT 1 BY uuid
)
SELECT
    if(product = '', '(unknown)', product) AS product_name,
    sum(n_requests) AS requests,
    sum(n_attempts) AS attempts,
    sum(n_invalid) AS invalid_attempts,
    if(attempts = 0, 0, invalid_attempts / attempts) AS invalid_attempt_rate,
    sum(n_failures) AS model_output_failures,
    if(requests = 0, 0, model_output_failures / requests) AS failure_rate
FROM
(
    SELECT
        p.product AS product,
        uniqExact(a.idempotency_key) AS n_requests,
        count() AS n_attempts,
        countIf(a.validation_status = 'invalid') AS n_invalid,
        toUInt64(0) AS n_failures
    FROM
    (
        SELECT request_uuid, idempotency_key, validation_status
        FROM inference_attempts
        WHERE event_time >= {since:DateTime64(3, 'UTC')}
        ORDER BY version DESC
        LIMIT 1 BY idempotency_key, attempt
    ) AS a
    LEFT JOIN products AS p ON p.uuid = a.request_uuid
    GROUP BY product

    UNION ALL

    SELECT
        p.product AS product,
        toUInt64(0) AS n_requests,
        toUInt64(0) AS n_attempts,
        toUInt64(0) AS n_invalid,
        count() AS n_failures
    FROM
    (
        SELECT request_uuid
        FROM dead_letters
        WHERE event_time >= {since:DateTime64(3, 'UTC')} AND error_code = 1301
        ORDER BY version DESC
        LIMIT 1 BY original_topic, original_partition, original_offset
    ) AS d
    LEFT JOIN products AS p ON p.uuid = d.request_uuid
    GROUP BY product
)
GROUP BY product_name
ORDER BY failure_rate DESC, requests DESC, product_name
