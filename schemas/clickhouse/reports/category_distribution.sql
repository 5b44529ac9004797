-- Categorized listings per category (time: the category-tag message's timestamp).
-- Columns: category, listings, share (of all listings in the window), avg_score.
-- Each input counts once: the latest copy per idempotency_key.
SELECT
    category,
    count() AS listings,
    listings / sum(listings) OVER () AS share,
    avg(score) AS avg_score
FROM
(
    SELECT category, score
    FROM category_tags
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY version DESC
    LIMIT 1 BY idempotency_key
)
GROUP BY category
ORDER BY listings DESC, category
