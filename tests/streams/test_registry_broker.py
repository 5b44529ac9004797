"""The worker with a real schema registry (Apicurio Registry, Confluent-compatible API).

- a producer using only confluent_kafka's own serializer registers the v1 schemas and
  sends Confluent-framed events; the worker's outputs are Confluent-framed and a plain
  `confluent_kafka.schema_registry` consumer decodes them; an event framed with a schema
  id the registry does not know is dead-lettered with UNKNOWN_SCHEMA and its bytes;
- registry outage: events framed with an id the worker has not seen yet are neither
  dead-lettered nor acknowledged while the registry is down, and all get decisions once
  it is back.
"""

from __future__ import annotations

import io
import json
import struct
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka import Consumer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from processors.errors import ErrorCode
from schemas import avro_schema_json
from streams.kafka_admin import ensure_topics
from tests.conftest import LocalRegistry, WorkerProcess
from tests.streams.test_worker_broker import record_outputs, worker_env
from tests.support.events import pickup_event, product_event, valid_answer
from tests.support.kafka_io import produce

pytestmark = pytest.mark.broker

Records = dict[str, list[dict[str, Any]]]


def v1_schema(name: str) -> str:
    """The released v1 schema file's text, as another team's producer would load it."""
    root = Path(__file__).resolve().parents[2] / "schemas" / "avro"
    return (root / name / "v1.avsc").read_text(encoding="utf-8")


def produce_with_serializer(
    bootstrap: str, registry_url: str, topic: str, schema: str, events: list[dict[str, Any]]
) -> None:
    """Produce like a non-visionstream service: confluent_kafka's AvroSerializer, auto-register."""
    with SchemaRegistryClient({"url": registry_url}) as client:
        serializer = AvroSerializer(client, schema)
        context = SerializationContext(topic, MessageField.VALUE)
        produce(bootstrap, topic, [(None, serializer(event, context)) for event in events])


def collect_framed(
    bootstrap: str, registry_url: str, topics: list[str], done: Callable[[Records], bool]
) -> tuple[Records, list[bytes]]:
    """Read `topics` with a plain AvroDeserializer; also returns every raw value read."""
    client = SchemaRegistryClient({"url": registry_url})
    deserializer = AvroDeserializer(client)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"registry-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(topics)
    records: Records = {t: [] for t in topics}
    raw: list[bytes] = []
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and not done(records):
            for message in consumer.consume(500, timeout=0.5):
                if message.error():
                    continue
                topic, value = message.topic(), message.value()
                assert topic is not None and value is not None
                context = SerializationContext(topic, MessageField.VALUE)
                raw.append(value)
                records[topic].append(deserializer(value, context))
    finally:
        consumer.close()
        client.close()
    return records, raw


def test_confluent_framed_events_and_outputs_through_a_real_registry(
    kafka_bootstrap: str,
    schema_registry: LocalRegistry,
    unique: str,
    tmp_path: Path,
    categorizer_artifacts: Path,
) -> None:
    url = schema_registry.url
    env = worker_env(
        kafka_bootstrap, unique, tmp_path, categorizer_artifacts, VS_SCHEMA_REGISTRY_URL=url
    )
    topics = {k: v for k, v in env.items() if k.startswith("VS_TOPIC_")}
    ensure_topics(kafka_bootstrap, topics.values(), 4)
    pickups = [pickup_event(n) for n in range(4)]
    record_outputs(
        tmp_path / "outputs.jsonl",
        [p["uuid"] for p in pickups],
        [valid_answer("Accept"), valid_answer("Reject", colour="No")] * 2,
    )
    pickup_topic = topics["VS_TOPIC_PICKUP_COMPLETED"]
    produce_with_serializer(
        kafka_bootstrap, url, pickup_topic, v1_schema("pickup-completed"), pickups
    )
    produce_with_serializer(
        kafka_bootstrap,
        url,
        topics["VS_TOPIC_PRODUCT_LISTED"],
        v1_schema("product-listed"),
        [product_event(1), product_event(2)],
    )
    # A well-formed Avro body behind a schema id that was never registered.
    body = io.BytesIO()
    fastavro.schemaless_writer(
        body, fastavro.parse_schema(avro_schema_json("pickup-completed")), pickup_event(9)
    )
    unknown_id = b"\x00" + struct.pack(">I", 2_000_000_000) + body.getvalue()
    produce(kafka_bootstrap, pickup_topic, [(b"unknown-id", unknown_id)])

    outputs = [
        topics["VS_TOPIC_VERIFICATION_DECISION"],
        topics["VS_TOPIC_CATEGORY_TAG"],
        topics["VS_TOPIC_DEAD_LETTER"],
    ]
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        records, raw = collect_framed(
            kafka_bootstrap, url, outputs, lambda r: sum(len(v) for v in r.values()) >= 7
        )
    finally:
        worker.stop()
    decisions, tags, dead = (records[t] for t in outputs)
    assert sorted(d["shippingid"] for d in decisions) == [p["shippingid"] for p in pickups], (
        worker.log_tail()
    )
    assert {d["shippingid"]: d["ai_decision"] for d in decisions}["SHP-00001"] == "Not Pick"
    assert {t["product_id"] for t in tags} == {"PROD-00001", "PROD-00002"}
    assert [(d["error_code"], d["stage"]) for d in dead] == [
        (int(ErrorCode.UNKNOWN_SCHEMA), "decode")
    ]
    assert dead[0]["original_value"] == unknown_id
    # Every output is Confluent-framed with an id the registry serves, under <schema>-value.
    assert all(value[:1] == b"\x00" for value in raw)
    with SchemaRegistryClient({"url": url}) as client:
        subjects = set(client.get_subjects())
        assert {
            f"{pickup_topic}-value",
            "verification-decision-value",
            "category-tag-value",
            "dead-letter-value",
        } <= subjects
        for value in raw:
            (schema_id,) = struct.unpack(">I", value[1:5])
            schema_str = client.get_schema(schema_id).schema_str
            assert schema_str is not None and json.loads(schema_str)["type"] == "record"


def test_a_registry_outage_holds_new_schema_ids_and_loses_nothing(
    kafka_bootstrap: str,
    schema_registry: LocalRegistry,
    unique: str,
    tmp_path: Path,
    categorizer_artifacts: Path,
) -> None:
    url = schema_registry.url
    env = worker_env(
        kafka_bootstrap, unique, tmp_path, categorizer_artifacts, VS_SCHEMA_REGISTRY_URL=url
    )
    topics = {k: v for k, v in env.items() if k.startswith("VS_TOPIC_")}
    ensure_topics(kafka_bootstrap, topics.values(), 4)
    pickup_topic = topics["VS_TOPIC_PICKUP_COMPLETED"]
    decisions_topic = topics["VS_TOPIC_VERIFICATION_DECISION"]
    dead_topic = topics["VS_TOPIC_DEAD_LETTER"]
    first = pickup_event(100)
    later = [pickup_event(n) for n in range(101, 107)]
    record_outputs(
        tmp_path / "outputs.jsonl",
        [p["uuid"] for p in [first, *later]],
        [valid_answer("Accept")] * (1 + len(later)),
    )
    # The producer evolves its schema (v1 + a field with a default): a new id, registered
    # while the registry is up, that the worker has never fetched.
    evolved = json.loads(v1_schema("pickup-completed"))
    evolved["fields"].append({"name": "producer_note", "type": "string", "default": ""})
    with SchemaRegistryClient({"url": url}) as client:
        new_id = client.register_schema(
            f"{pickup_topic}-value", Schema(json.dumps(evolved), "AVRO")
        )
    parsed = fastavro.parse_schema(evolved)
    framed = []
    for event in later:
        body = io.BytesIO()
        fastavro.schemaless_writer(body, parsed, {**event, "producer_note": "from v1.1"})
        framed.append(
            (event["shippingid"].encode(), b"\x00" + struct.pack(">I", new_id) + body.getvalue())
        )

    produce_with_serializer(
        kafka_bootstrap, url, pickup_topic, v1_schema("pickup-completed"), [first]
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        warmed, _ = collect_framed(
            kafka_bootstrap, url, [decisions_topic], lambda r: len(r[decisions_topic]) >= 1
        )
        assert len(warmed[decisions_topic]) == 1, worker.log_tail()
        schema_registry.stop()
        try:
            produce(kafka_bootstrap, pickup_topic, framed)
            time.sleep(8)  # the worker sees the new id while the registry is down
            assert "retrying" in worker.log_tail(200), worker.log_tail()
        finally:
            schema_registry.start()
        records, _ = collect_framed(
            kafka_bootstrap,
            url,
            [decisions_topic, dead_topic],
            lambda r: len(r[decisions_topic]) >= 1 + len(later),
        )
    finally:
        worker.stop()
    held = sorted(d["shippingid"] for d in records[decisions_topic])
    assert held == sorted(p["shippingid"] for p in [first, *later]), worker.log_tail()
    assert records[dead_topic] == [], records[dead_topic]
