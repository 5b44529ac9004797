-- Share of decisions that asked the courier to retake photos, per product.
-- Columns: product_id ('(none)' when the request had no product id), decisions,
-- retake_decisions (at least one question with isRetakeImage = 'true'), retake_rate.
-- Each input counts once: the latest copy per idempotency_key.
SELECT
    if(product_id = '', '(none)', product_id) AS product,
    count() AS decisions,
    countIf(retake_requested) AS retake_decisions,
    retake_decisions / decisions AS retake_rate
FROM
(
    SELECT product_id, retake_requested
    FROM verification_decisions
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY version DESC
    LIMIT 1 BY idempotency_key
)
GROUP BY product
ORDER BY retake_rate DESC, decisions DESC, product
