"""The one topic→contract map: every contract has a schema, renamed topics keep theirs."""

from __future__ import annotations

import pytest

from processors.contracts import CONTRACTS, DEFAULT_TOPICS, PICKUP_COMPLETED, Topics
from schemas import avro_topics


def test_every_contract_has_an_avro_schema_and_every_schema_a_topic() -> None:
    assert sorted(CONTRACTS) == avro_topics()
    assert DEFAULT_TOPICS.all() == CONTRACTS


def test_a_renamed_topic_keeps_its_contract_and_the_old_name_is_unknown() -> None:
    topics = Topics(pickup_completed="prod.pickups")
    assert topics.schema_of("prod.pickups") == PICKUP_COMPLETED
    assert topics.schema_of("dead-letter") == "dead-letter"
    with pytest.raises(KeyError, match="pickup-completed"):
        topics.schema_of("pickup-completed")


def test_two_contracts_on_one_topic_resolve_to_the_first_field() -> None:
    topics = Topics(verification_attempts="shared", dead_letter="shared")
    assert topics.schema_of("shared") == "verification-attempts"
