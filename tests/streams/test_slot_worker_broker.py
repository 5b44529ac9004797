"""The worker in slot mode on the real broker, run as a real process.

- out-of-order completions and a SIGKILL mid-stream: at the kill, every input below each
  partition's committed offset already has its decision on the broker (the committed
  offset never passed an input whose outputs were not acknowledged), and after the
  restart every input has a decision (nothing lost);
- the real slot engine on a tiny random InternVL (CPU), decoding freely: every answer is
  invalid, so each request is submitted twice (the retry is a new submission) and ends as
  a coded dead letter.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from streams.codecs import Codecs
from streams.kafka_admin import ensure_topics
from tests.conftest import WorkerProcess
from tests.streams.test_sink_broker import all_topics
from tests.streams.test_verification_broker import image_server  # noqa: F401 (fixture)
from tests.streams.test_worker_broker import record_outputs, worker_env
from tests.support.events import pickup_event, valid_answer
from tests.support.kafka_io import collect, produce, source_of
from tests.support.tiny_internvl import build_tiny_original_internvl

pytestmark = pytest.mark.broker


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (0 where nothing is committed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: max(tp.offset, 0) for tp in consumer.committed(tps, timeout=10)}
    finally:
        consumer.close()


def published_order(log_path: Path) -> dict[int, list[int]]:
    """Input offsets per input partition in the order their outcomes were logged."""
    order: dict[int, list[int]] = defaultdict(list)
    for line in log_path.read_text(errors="replace").splitlines():
        if '"event": "outcome"' not in line:
            continue
        try:
            record = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        order[int(record["partition"])].append(int(record["offset"]))
    return order


@pytest.mark.slow
def test_out_of_order_completions_and_sigkill_lose_nothing_and_never_commit_past_pending(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    count = 600
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_ENGINE_MODE="slot",
        VS_SLOT_QUEUE_SIZE="16",
        VS_BATCH_SIZE="8",
    )
    topics = {k: v for k, v in env.items() if k.startswith("VS_TOPIC_")}
    ensure_topics(kafka_bootstrap, topics.values(), 4)
    events = [pickup_event(n) for n in range(count)]
    record_outputs(
        tmp_path / "outputs.jsonl", [e["uuid"] for e in events], [valid_answer()] * count
    )
    codec = Codecs().for_schema("pickup-completed")
    pickups = topics["VS_TOPIC_PICKUP_COMPLETED"]
    positions = produce(
        kafka_bootstrap, pickups, [(e["shippingid"].encode(), codec.encode(e)) for e in events]
    )
    decisions_topic = topics["VS_TOPIC_VERIFICATION_DECISION"]
    wanted = {
        decisions_topic: "verification-decision",
        topics["VS_TOPIC_DEAD_LETTER"]: "dead-letter",
    }

    first = WorkerProcess(env, tmp_path / "worker-1.log", module="tests.support.slot_worker")
    # Kill it with slow inputs pending (tests/support/slot_worker.py: 8 s each) and many
    # inputs after them done.
    partial = collect(kafka_bootstrap, wanted, lambda r: len(r[decisions_topic]) >= 300, 120)
    first.kill()
    assert len(partial[decisions_topic]) >= 300, first.log_tail()
    committed = committed_offsets(kafka_bootstrap, env["VS_APP_ID"], pickups, 4)
    snapshot = collect(kafka_bootstrap, wanted, lambda r: False, timeout=4)
    decided = {source_of("verification-decision", r) for r in snapshot[decisions_topic]}
    assert len(decided) < count, "the worker finished before it was killed"
    assert sum(committed.values()) > 0, "nothing was committed before the kill"
    for partition, offset in committed.items():
        below = {(pickups, partition, o) for o in range(offset)}
        missing = below - decided
        assert not missing, f"partition {partition} committed {offset} past {sorted(missing)}"
    # The engine did finish later inputs first: outcomes were published out of offset order.
    order = published_order(first.log_path)
    assert any(offsets != sorted(offsets) for offsets in order.values()), order

    second = WorkerProcess(env, tmp_path / "worker-2.log", module="tests.support.slot_worker")
    try:

        def covered(records: dict[str, list[dict[str, Any]]]) -> bool:
            return {source_of(wanted[t], r) for t in wanted for r in records[t]} >= set(positions)

        records = collect(kafka_bootstrap, wanted, covered, timeout=240)
    finally:
        second.stop()
    seen = {source_of(wanted[t], r) for t in wanted for r in records[t]}
    missing = set(positions) - seen
    assert not missing, f"{len(missing)} inputs lost; log:\n{second.log_tail()}"
    assert not records[topics["VS_TOPIC_DEAD_LETTER"]]
    keys = Counter(r["idempotency_key"] for r in records[decisions_topic])
    assert len(keys) == count


def test_tiny_internvl_on_the_slot_engine_resubmits_invalid_answers(
    kafka_bootstrap: str,
    unique: str,
    tmp_path: Path,
    categorizer_artifacts: Path,
    image_server: str,  # noqa: F811 (the fixture)
) -> None:
    model = build_tiny_original_internvl(tmp_path / "tiny-internvl")
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_ENGINE="internvl",
        VS_ENGINE_MODE="slot",
        VS_SLOT_COUNT="4",
        VS_MODEL_PATH=str(model),
        VS_MAX_NEW_TOKENS="8",
        VS_CONSTRAINED_DECODING="0",  # free decoding: the random model's answers are invalid
        VS_BATCH_SIZE="4",
        VS_IMAGE_ALLOW_LOOPBACK="true",
        VS_IMAGE_RETRIES="0",
    )
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    events = [pickup_event(n, vendor_urls=[f"{image_server}/vendor.jpg"]) for n in range(5)]
    codec = Codecs().for_schema("pickup-completed")
    positions = produce(
        kafka_bootstrap,
        env["VS_TOPIC_PICKUP_COMPLETED"],
        [(e["shippingid"].encode(), codec.encode(e)) for e in events],
    )
    wanted = {
        env["VS_TOPIC_DEAD_LETTER"]: "dead-letter",
        env["VS_TOPIC_VERIFICATION_DECISION"]: "verification-decision",
        env["VS_TOPIC_VERIFICATION_ATTEMPTS"]: "verification-attempts",
    }
    answered = {env["VS_TOPIC_DEAD_LETTER"], env["VS_TOPIC_VERIFICATION_DECISION"]}

    def all_answered(records: dict[str, list[dict[str, Any]]]) -> bool:
        return {source_of(wanted[t], r) for t in answered for r in records[t]} >= set(positions)

    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        records = collect(kafka_bootstrap, wanted, all_answered, timeout=240)
    finally:
        worker.stop()
    assert all_answered(records), worker.log_tail()
    log = worker.log_path.read_text(errors="replace")
    assert "runs static batches" not in log
    dead = {d["shippingid"]: d for d in records[env["VS_TOPIC_DEAD_LETTER"]]}
    for n in range(5):
        letter = dead[f"SHP-{n:05d}"]
        assert letter["error_code"] == 1301, letter
        assert set(letter["extra"]) >= {"raw_output_1", "raw_output_2"}
    attempts = records[env["VS_TOPIC_VERIFICATION_ATTEMPTS"]]
    # (A set: a rebalance at start may redeliver an input; duplicates keep their keys.)
    assert {(a["shippingid"], a["attempt"]) for a in attempts} == {
        (f"SHP-{n:05d}", k) for n in range(5) for k in (1, 2)
    }
    # Each attempt was its own submission, not a batch call.
    assert all(a["batch_size"] == 1 for a in attempts)


@pytest.mark.slow
def test_sigterm_with_slow_inputs_in_flight_exits_in_time_and_loses_nothing(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    count = 200
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_ENGINE_MODE="slot",
        VS_SLOT_QUEUE_SIZE="16",
        VS_BATCH_SIZE="8",
        VS_SHUTDOWN_TIMEOUT_S="12",
    )
    topics = {k: v for k, v in env.items() if k.startswith("VS_TOPIC_")}
    ensure_topics(kafka_bootstrap, topics.values(), 4)
    events = [pickup_event(n) for n in range(count)]
    record_outputs(
        tmp_path / "outputs.jsonl", [e["uuid"] for e in events], [valid_answer()] * count
    )
    codec = Codecs().for_schema("pickup-completed")
    positions = produce(
        kafka_bootstrap,
        topics["VS_TOPIC_PICKUP_COMPLETED"],
        [(e["shippingid"].encode(), codec.encode(e)) for e in events],
    )
    decisions_topic = topics["VS_TOPIC_VERIFICATION_DECISION"]
    wanted = {decisions_topic: "verification-decision"}
    first = WorkerProcess(env, tmp_path / "worker-1.log", module="tests.support.slot_worker")
    collect(kafka_bootstrap, wanted, lambda r: len(r[decisions_topic]) >= 60, 120)
    started = time.monotonic()
    code = first.stop(timeout=30)
    stopped_s = time.monotonic() - started
    print(f"exit code {code} after {stopped_s:.1f} s")
    assert stopped_s < 12 + 5, first.log_tail()
    second = WorkerProcess(env, tmp_path / "worker-2.log", module="tests.support.slot_worker")
    try:
        records = collect(
            kafka_bootstrap,
            wanted,
            lambda r: {source_of(wanted[t], x) for t in wanted for x in r[t]} >= set(positions),
            timeout=180,
        )
    finally:
        second.stop()
    seen = {source_of("verification-decision", x) for x in records[decisions_topic]}
    assert seen >= set(positions), f"{len(set(positions) - seen)} inputs lost"
