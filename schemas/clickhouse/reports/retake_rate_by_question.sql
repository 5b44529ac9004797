-- Share of answers with isRetakeImage = 'true', per question label.
-- Columns: label, answers, retakes, retake_rate.
-- Each question of each input counts once: the latest copy per
-- (idempotency_key, question_index).
SELECT
    label,
    count() AS answers,
    countIf(is_retake_image) AS retakes,
    retakes / answers AS retake_rate
FROM
(
    SELECT label, is_retake_image
    FROM question_answers
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY version DESC
    LIMIT 1 BY idempotency_key, question_index
)
GROUP BY label
ORDER BY retake_rate DESC, answers DESC, label
