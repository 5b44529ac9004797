-- Confusion matrix of the model's decision against the reviewer's decision.
-- Columns: ai_decision, reviewer_decision, reviews, share (of all reviewed decisions).
-- "Pick" by the model and "Not Pick" by the reviewer is a refund that should not have
-- been automatic. Each decision counts once: its latest verdict.
SELECT
    toString(ai_decision) AS ai_decision,
    toString(reviewer_decision) AS reviewer_decision,
    count() AS reviews,
    reviews / sum(reviews) OVER () AS share
FROM
(
    SELECT ai_decision, reviewer_decision
    FROM reviews
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY reviewed_ms DESC, version DESC
    LIMIT 1 BY decision_key
)
GROUP BY ai_decision, reviewer_decision
ORDER BY ai_decision, reviewer_decision
