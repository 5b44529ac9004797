-- Agreement of ai_decision with reviewers per UTC day of the verdict.
-- Columns: day, reviewed, agreed, agreement_rate, small_sample (fewer than 30 that day).
-- Each decision counts once, on the day of its latest verdict.
SELECT
    toDate(event_time) AS day,
    count() AS reviewed,
    countIf(agrees) AS agreed,
    agreed / reviewed AS agreement_rate,
    reviewed < 30 AS small_sample
FROM
(
    SELECT event_time, agrees
    FROM reviews
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY reviewed_ms DESC, version DESC
    LIMIT 1 BY decision_key
)
GROUP BY day
ORDER BY day
