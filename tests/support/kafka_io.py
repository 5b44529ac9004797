"""Test helpers to produce events and collect outputs on the real broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, Producer

from streams.codecs import Codecs
from streams.kafka_admin import source_of

__all__ = ["collect", "produce", "source_of"]


def produce(
    bootstrap: str, topic: str, values: Iterable[tuple[bytes | None, bytes]]
) -> list[tuple[str, int, int]]:
    """Produce raw (key, value) pairs; returns their (topic, partition, offset) positions.

    Positions come back in the order of `values`, whatever order the broker acknowledged
    them in (a large record can be appended before smaller ones sent earlier).
    """
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 20_000_000}
    )
    positions: dict[int, tuple[str, int, int]] = {}
    errors: list[str] = []

    def delivered_as(index: int) -> Callable[[Any, Any], None]:
        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                positions[index] = (msg.topic(), msg.partition(), msg.offset())

        return delivered

    count = 0
    for count, (key, value) in enumerate(values, start=1):
        producer.produce(topic, value, key=key, on_delivery=delivered_as(count - 1))
        producer.poll(0)
    assert producer.flush(60) == 0, "broker did not acknowledge"
    assert not errors, errors
    return [positions[index] for index in range(count)]


def collect(
    bootstrap: str,
    topics: dict[str, str],
    done: Callable[[dict[str, list[dict[str, Any]]]], bool],
    timeout: float,
) -> dict[str, list[dict[str, Any]]]:
    """Read `topics` (name → schema) from the start until `done(records)` or the timeout."""
    codecs = Codecs()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(list(topics))
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in topics}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(records):
            for message in consumer.consume(500, timeout=0.5):
                if message.error():
                    continue
                topic = message.topic()
                assert topic is not None
                records[topic].append(codecs.for_schema(topics[topic]).decode(message.value()))
    finally:
        consumer.close()
    return records
