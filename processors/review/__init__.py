"""The review loop: reviewer verdicts, accuracy reports and review copies of images.

- `rows`: the sink's rows for the `verification-review` and `review-image` topics.
- `images`: small, content-addressed JPEG copies of what the model received.
- `store`: reads for the review page (queue, one decision, copies) and retention.
- `verdicts`: the `verification-review` event a submitted form becomes.

See docs/review.md for the flow.
"""
