-- Agreement of ai_decision with reviewers, and answer accuracy, per product_id.
-- Columns: product_id, reviewed, agreed, agreement_rate, answers_marked, answers_wrong,
-- answer_accuracy, small_sample (fewer than 30 reviewed decisions).
-- Each decision counts once: its latest verdict.
SELECT
    product_id,
    count() AS reviewed,
    countIf(agrees) AS agreed,
    agreed / reviewed AS agreement_rate,
    sum(answers_marked) AS answers_marked,
    sum(answers_wrong) AS answers_wrong,
    if(answers_marked = 0, nan, 1 - answers_wrong / answers_marked) AS answer_accuracy,
    reviewed < 30 AS small_sample
FROM
(
    SELECT product_id, agrees, answers_marked, answers_wrong
    FROM reviews
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY reviewed_ms DESC, version DESC
    LIMIT 1 BY decision_key
)
GROUP BY product_id
ORDER BY reviewed DESC, product_id
