-- Accuracy of the model's answers as reviewers marked them, per question type and label.
-- Columns: type, label, marked, correct, accuracy, small_sample (fewer than 30 marks).
-- Only the marks of each decision's latest verdict count; an answer the reviewer left
-- unmarked is not counted.
SELECT
    type,
    label,
    count() AS marked,
    countIf(correct) AS correct,
    correct / marked AS accuracy,
    marked < 30 AS small_sample
FROM
(
    SELECT type, label, correct
    FROM review_answers
    WHERE review_id IN
    (
        SELECT review_id
        FROM reviews
        WHERE event_time >= {since:DateTime64(3, 'UTC')}
        ORDER BY reviewed_ms DESC, version DESC
        LIMIT 1 BY decision_key
    )
    ORDER BY version DESC
    LIMIT 1 BY review_id, question_index
)
GROUP BY type, label
ORDER BY type, accuracy, label
