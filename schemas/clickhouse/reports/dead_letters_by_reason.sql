-- Dead letters per reason.
-- Columns: error_code, error_name, stage, dead_letters.
-- Each failed input counts once: the latest dead letter per original position
-- (original_topic, original_partition, original_offset).
SELECT
    error_code,
    error_name,
    stage,
    count() AS dead_letters
FROM
(
    SELECT error_code, error_name, stage
    FROM dead_letters
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY version DESC
    LIMIT 1 BY original_topic, original_partition, original_offset
)
GROUP BY error_code, error_name, stage
ORDER BY dead_letters DESC, error_code, stage
