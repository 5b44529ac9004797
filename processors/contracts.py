"""The event contracts and the Kafka topics that carry them: the one topic→contract map.

A contract is the name of an event schema, the folder `schemas/avro/<contract>/`
(e.g. `pickup-completed`). `Topics` names the topic configured for each contract;
by default a topic is called after its contract, and a deployment may rename any of
them (`VS_TOPIC_<FIELD>`). Every layer that must know what a topic carries asks
`Topics.schema_of()`: the analytics sink (which tables a record becomes,
`processors/analytics/rows.py`) and the streams layer (which codec decodes or
encodes a topic). Identities derived from an event use the contract, never the
configured topic name, so renaming a topic keeps them (`records.input_key`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

PICKUP_COMPLETED: Final = "pickup-completed"
PRODUCT_LISTED: Final = "product-listed"
VERIFICATION_DECISION: Final = "verification-decision"
CATEGORY_TAG: Final = "category-tag"
VERIFICATION_ATTEMPTS: Final = "verification-attempts"
DEAD_LETTER: Final = "dead-letter"
VERIFICATION_REVIEW: Final = "verification-review"
REVIEW_IMAGE: Final = "review-image"


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic name of each contract; a field is its contract with `_` for `-`.

    Which tables each topic fills is fixed by the DDL
    (`schemas/clickhouse/migrations/`); the analytics sink reads all of them.
    """

    pickup_completed: str = PICKUP_COMPLETED
    product_listed: str = PRODUCT_LISTED
    verification_decision: str = VERIFICATION_DECISION
    category_tag: str = CATEGORY_TAG
    verification_attempts: str = VERIFICATION_ATTEMPTS
    dead_letter: str = DEAD_LETTER
    verification_review: str = VERIFICATION_REVIEW
    review_image: str = REVIEW_IMAGE

    def all(self) -> tuple[str, ...]:
        """Every configured topic name, in the order of the fields."""
        return tuple(getattr(self, item.name) for item in fields(self))

    def schema_of(self, topic: str) -> str:
        """The contract (schema folder name) of a configured topic name.

        When two contracts were configured to one topic name, the first field wins.
        Raises `KeyError` for a topic no contract is configured to.
        """
        for item in fields(self):
            if getattr(self, item.name) == topic:
                return item.name.replace("_", "-")
        raise KeyError(f"unknown topic {topic!r}")


#: The topic names when none is configured: each contract's own name.
DEFAULT_TOPICS: Final = Topics()
#: Every contract, in the order of the `Topics` fields.
CONTRACTS: Final = tuple(item.name.replace("_", "-") for item in fields(Topics))

__all__ = [
    "CATEGORY_TAG",
    "CONTRACTS",
    "DEAD_LETTER",
    "DEFAULT_TOPICS",
    "PICKUP_COMPLETED",
    "PRODUCT_LISTED",
    "REVIEW_IMAGE",
    "VERIFICATION_ATTEMPTS",
    "VERIFICATION_DECISION",
    "VERIFICATION_REVIEW",
    "Topics",
]
