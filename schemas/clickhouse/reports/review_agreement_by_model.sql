-- Agreement of ai_decision with reviewers, and answer accuracy, per model_version.
-- Columns: model_version, reviewed, agreed, agreement_rate, answers_marked, answers_wrong,
-- answer_accuracy, small_sample (fewer than 30 reviewed decisions).
-- Each decision counts once: its latest verdict.
SELECT
    model_version,
    count() AS reviewed,
    countIf(agrees) AS agreed,
    agreed / reviewed AS agreement_rate,
    sum(answers_marked) AS answers_marked,
    sum(answers_wrong) AS answers_wrong,
    if(answers_marked = 0, nan, 1 - answers_wrong / answers_marked) AS answer_accuracy,
    reviewed < 30 AS small_sample
FROM
(
    SELECT model_version, agrees, answers_marked, answers_wrong
    FROM reviews
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY reviewed_ms DESC, version DESC
    LIMIT 1 BY decision_key
)
GROUP BY model_version
ORDER BY reviewed DESC, model_version
