"""The lag probe rides over a cluster in motion and stops on real errors."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from streams import kafka_admin


def test_a_moving_leader_counts_as_not_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[object] = [
        KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION)),
        {("t", 0): 3},
        {("t", 0): 0},
    ]

    def group_lag(*_: object) -> dict[tuple[str, int], int]:
        answer = answers.pop(0)
        if isinstance(answer, KafkaException):
            raise answer
        assert isinstance(answer, dict)
        return answer

    monkeypatch.setattr(kafka_admin, "group_lag", group_lag)
    monkeypatch.setattr("streams.kafka_admin.time.sleep", lambda _: None)
    assert kafka_admin.wait_for_lag_zero("127.0.0.1:1", "g", ["t"], timeout=30)
    assert answers == []


def test_other_kafka_errors_propagate(monkeypatch: pytest.MonkeyPatch) -> None:
    def group_lag(*_: object) -> dict[tuple[str, int], int]:
        raise KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))

    monkeypatch.setattr(kafka_admin, "group_lag", group_lag)
    with pytest.raises(KafkaException):
        kafka_admin.wait_for_lag_zero("127.0.0.1:1", "g", ["t"], timeout=30)
