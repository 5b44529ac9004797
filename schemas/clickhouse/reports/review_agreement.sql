-- Agreement of the model's ai_decision with reviewers, over the verdicts given in the window.
-- Columns: reviewed, agreed, disagreed, agreement_rate, agreement_low, agreement_high, small_sample.
-- agreement_low / agreement_high: the 95% Wilson interval of agreement_rate; small_sample:
-- fewer than 30 reviewed decisions, too few to trust the rate.
-- Each decision counts once: its latest verdict (ORDER BY reviewed_ms DESC LIMIT 1 BY decision_key).
SELECT
    count() AS reviewed,
    countIf(agrees) AS agreed,
    reviewed - agreed AS disagreed,
    if(reviewed = 0, nan, agreed / reviewed) AS agreement_rate,
    if(reviewed = 0, nan,
       (agreement_rate + 1.9208 / reviewed
        - 1.96 * sqrt(agreement_rate * (1 - agreement_rate) / reviewed + 0.9604 / (reviewed * reviewed)))
       / (1 + 3.8416 / reviewed)) AS agreement_low,
    if(reviewed = 0, nan,
       (agreement_rate + 1.9208 / reviewed
        + 1.96 * sqrt(agreement_rate * (1 - agreement_rate) / reviewed + 0.9604 / (reviewed * reviewed)))
       / (1 + 3.8416 / reviewed)) AS agreement_high,
    reviewed < 30 AS small_sample
FROM
(
    SELECT agrees
    FROM reviews
    WHERE event_time >= {since:DateTime64(3, 'UTC')}
    ORDER BY reviewed_ms DESC, version DESC
    LIMIT 1 BY decision_key
)
