"""Small confluent-kafka helpers shared by the demo, the CLI and the tests."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def source_of(schema: str, record: Mapping[str, Any]) -> tuple[str, int, int] | None:
    """The input position an output record points back to (None if it carries none).

    Dead letters keep it in `source_topic/partition/offset`; decisions and tags in `source`.
    """
    if schema == "dead-letter":
        return (record["source_topic"], record["source_partition"], record["source_offset"])
    source = record.get("source")
    if not source:
        return None
    return (source["topic"], source["partition"], source["offset"])


def bootstrap_servers(broker_url: str) -> str:
    """`kafka://host:port;kafka://host2:port` (faust style) → `host:port,host2:port`."""
    parts = [part.strip() for part in broker_url.replace(";", ",").split(",") if part.strip()]
    return ",".join(part.split("://", 1)[-1] for part in parts)


def ensure_topics(
    bootstrap: str, topics: Iterable[str], partitions: int, timeout: float = 30.0
) -> None:
    """Create the topics that do not exist yet (replication factor 1); raises on failure."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [
        NewTopic(t, num_partitions=partitions, replication_factor=1)
        for t in topics
        if t not in existing
    ]
    if not missing:
        return
    for topic, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result()
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {topic}: {exc}") from exc


def group_lag(
    bootstrap: str, group: str, topics: Iterable[str], timeout: float = 10.0
) -> dict[tuple[str, int], int]:
    """End offset minus committed offset per partition (no commit counts as 0)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(timeout=timeout)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in metadata.topics
            for p in metadata.topics[topic].partitions
        ]
        committed = consumer.committed(partitions, timeout=timeout)
        lag: dict[tuple[str, int], int] = {}
        for tp in committed:
            _, high = consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=timeout
            )
            done = tp.offset if tp.offset >= 0 else 0
            lag[(tp.topic, tp.partition)] = max(high - done, 0)
        return lag
    finally:
        consumer.close()


#: Errors of a cluster in motion (a new topic's leader being elected, a broker briefly away).
_PASSING_ERRORS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        # librdkafka spells its local (client-side) error codes with a leading underscore:
        # these are confluent-kafka's public names, not private members.
        KafkaError._TIMED_OUT,  # noqa: SLF001
        KafkaError._TRANSPORT,  # noqa: SLF001
    }
)


def _passing(exc: KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return isinstance(error, KafkaError) and (error.retriable() or error.code() in _PASSING_ERRORS)


def wait_for_lag_zero(bootstrap: str, group: str, topics: Iterable[str], timeout: float) -> bool:
    """Whether `group` reaches zero lag on `topics` within `timeout` seconds.

    A retriable broker error (a leader moving while topics are new, say) counts as "not
    yet" and is asked again; any other Kafka error propagates.
    """
    topics = list(topics)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sum(group_lag(bootstrap, group, topics).values()) == 0:
                return True
        except KafkaException as exc:
            if not _passing(exc):
                raise
        time.sleep(0.5)
    return False
