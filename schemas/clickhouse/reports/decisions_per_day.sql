-- Verification decisions per UTC day and AI decision.
-- Columns: day, ai_decision, decisions.
-- Each input counts once: the latest copy per idempotency_key.
SELECT
    toDate(event_time) AS day,
    ai_decision,
    count() AS decisions
FROM
(
    SELECT event_time, ai_decision
    FROM verification_decisions
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY version DESC
    LIMIT 1 BY idempotency_key
)
GROUP BY day, ai_decision
ORDER BY day, ai_decision
