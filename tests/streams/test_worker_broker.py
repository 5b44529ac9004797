"""The inference worker on the real local broker, run as a real process.

- pickup and product events in, decisions and tags out; malformed bytes between them
  land on the dead-letter topic with a reason while the good events still get outputs;
- loss: 1,000 events, the worker SIGKILLed while processing, restarted: every input
  has at least one output (duplicates allowed, with the same idempotency key).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from streams.codecs import Codecs
from streams.kafka_admin import ensure_topics
from tests.conftest import WorkerProcess, topic_env
from tests.support.events import free_port, pickup_event, product_event, valid_answer
from tests.support.kafka_io import collect, produce, source_of

pytestmark = pytest.mark.broker


def worker_env(
    bootstrap: str, unique: str, tmp_path: Path, artifacts: Path, **extra: str
) -> dict[str, str]:
    return {
        "VS_KAFKA_BROKER": f"kafka://{bootstrap}",
        "VS_APP_ID": f"test-{unique}",
        "VS_WEB_PORT": str(free_port()),
        "VS_STATE_DIR": str(tmp_path / "state"),
        "VS_ENGINE": "replay",
        "VS_REPLAY_OUTPUTS": str(tmp_path / "outputs.jsonl"),
        "VS_CATEGORIZER_ARTIFACTS": str(artifacts),
        "VS_BATCH_SIZE": "16",
        "VS_BATCH_WAIT_S": "0.2",
        "VS_LOG_FORMAT": "json",
        **topic_env(unique),
        **extra,
    }


def record_outputs(path: Path, uuids: list[str], texts: list[str]) -> None:
    path.write_text(
        "".join(
            json.dumps({"uuid": u, "model_outputs": [t]}) + "\n"
            for u, t in zip(uuids, texts, strict=True)
        )
    )


def test_events_flow_and_malformed_bytes_are_dead_lettered(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    env = worker_env(kafka_bootstrap, unique, tmp_path, categorizer_artifacts)
    topics = {k: v for k, v in env.items() if k.startswith("VS_TOPIC_")}
    ensure_topics(kafka_bootstrap, topics.values(), 4)
    pickups = [pickup_event(n) for n in range(6)]
    record_outputs(
        tmp_path / "outputs.jsonl",
        [p["uuid"] for p in pickups],
        [valid_answer("Accept"), valid_answer("Reject", colour="No")] * 3,
    )
    codec = Codecs().for_schema("pickup-completed")
    values: list[tuple[bytes | None, bytes]] = []
    for n, event in enumerate(pickups):
        # Mix the three accepted wire formats.
        encoded = codec.encode_json(event) if n % 3 == 2 else codec.encode(event)
        values.append((event["shippingid"].encode(), encoded))
        if n == 2:
            values.append((b"junk-1", b"\x07garbage that is no event"))
        if n == 4:
            values.append((b"junk-2", json.dumps({"shippingid": "no-images"}).encode()))
    pickup_positions = produce(kafka_bootstrap, topics["VS_TOPIC_PICKUP_COMPLETED"], values)
    product_codec = Codecs().for_schema("product-listed")
    product_positions = produce(
        kafka_bootstrap,
        topics["VS_TOPIC_PRODUCT_LISTED"],
        [
            (b"p1", product_codec.encode(product_event(1))),
            (b"p2", product_codec.encode(product_event(2, image=None))),
        ],
    )

    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        wanted = {
            topics["VS_TOPIC_VERIFICATION_DECISION"]: "verification-decision",
            topics["VS_TOPIC_CATEGORY_TAG"]: "category-tag",
            topics["VS_TOPIC_DEAD_LETTER"]: "dead-letter",
            topics["VS_TOPIC_VERIFICATION_ATTEMPTS"]: "verification-attempts",
        }
        expected = len(pickup_positions) + len(product_positions)

        def all_answered(records: dict[str, list[dict[str, Any]]]) -> bool:
            n = sum(len(records[t]) for t in wanted if wanted[t] != "verification-attempts")
            return n >= expected

        records = collect(kafka_bootstrap, wanted, all_answered, timeout=150)
    finally:
        worker.stop()
    decisions = records[topics["VS_TOPIC_VERIFICATION_DECISION"]]
    dead = records[topics["VS_TOPIC_DEAD_LETTER"]]
    tags = records[topics["VS_TOPIC_CATEGORY_TAG"]]
    assert len(decisions) == 6, worker.log_tail()
    by_shipment = {d["shippingid"]: d for d in decisions}
    assert (
        by_shipment["SHP-00000"]["ai_decision"] == "Pick"
        and by_shipment["SHP-00000"]["StatusCode"] == 200
    )
    assert (
        by_shipment["SHP-00001"]["ai_decision"] == "Not Pick"
        and by_shipment["SHP-00001"]["StatusCode"] == 202
    )
    assert all(
        d["idempotency_key"] and d["source"]["topic"] == topics["VS_TOPIC_PICKUP_COMPLETED"]
        for d in decisions
    )
    assert len(records[topics["VS_TOPIC_VERIFICATION_ATTEMPTS"]]) >= 6
    codes = Counter(d["error_code"] for d in dead)
    assert codes == {1002: 1, 1004: 1}, dead
    junk = next(d for d in dead if d["error_code"] == 1002)
    assert junk["original_value"] == b"\x07garbage that is no event"
    assert junk["stage"] == "decode" and junk["error_message"]
    assert {t["product_id"] for t in tags} == {"PROD-00001", "PROD-00002"}
    assert all(len(t["top_categories"]) == 3 for t in tags)


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    count = 1000
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_BATCH_SIZE="8",
        VS_REPLAY_LATENCY_S="0.05",  # ~125 batches: several seconds of work
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
    wanted = {
        decisions_topic: "verification-decision",
        topics["VS_TOPIC_DEAD_LETTER"]: "dead-letter",
    }

    worker = WorkerProcess(env, tmp_path / "worker-1.log")
    # Kill it once it is visibly mid-stream: some decisions out, most still to do.
    partial = collect(kafka_bootstrap, wanted, lambda r: len(r[decisions_topic]) >= 50, timeout=120)
    worker.kill()
    assert len(partial[decisions_topic]) >= 50, worker.log_tail()
    # Everything the killed worker managed to publish: proof the kill was mid-stream.
    snapshot = collect(kafka_bootstrap, wanted, lambda r: False, timeout=4)
    assert len(snapshot[decisions_topic]) < count, "the worker finished before it was killed"

    restarted = WorkerProcess(env, tmp_path / "worker-2.log")
    try:

        def covered(records: dict[str, list[dict[str, Any]]]) -> bool:
            seen = {source_of(wanted[t], r) for t in wanted for r in records[t]}
            return seen >= set(positions)

        records = collect(kafka_bootstrap, wanted, covered, timeout=240)
    finally:
        restarted.stop()
    seen = {source_of(wanted[t], r) for t in wanted for r in records[t]}
    missing = set(positions) - seen
    assert not missing, f"{len(missing)} inputs lost; log:\n{restarted.log_tail()}"
    assert not records[topics["VS_TOPIC_DEAD_LETTER"]]
    # Redelivered inputs repeat their idempotency key rather than inventing a new one.
    keys = Counter(r["idempotency_key"] for r in records[decisions_topic])
    assert len(keys) == count


def test_artifacts_from_other_encoders_stop_the_worker_at_start(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    env = worker_env(
        kafka_bootstrap, unique, tmp_path, categorizer_artifacts, VS_IMAGE_INPUT_SIZE="112"
    )
    (tmp_path / "outputs.jsonl").write_text("")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        code = worker.process.wait(120)
    finally:
        worker.stop()
    assert code != 0
    log = worker.log_path.read_text(errors="replace")
    assert "start-up failed" in log and "112" in log and "224" in log, worker.log_tail()


def test_a_worker_with_neither_a_model_nor_replay_refuses_to_start(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    env = worker_env(kafka_bootstrap, unique, tmp_path, categorizer_artifacts)
    del env["VS_ENGINE"]  # recorded outputs exist, but nobody asked for the replay engine
    record_outputs(tmp_path / "outputs.jsonl", ["req-00000"], [valid_answer()])
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        code = worker.process.wait(120)
    finally:
        worker.stop()
    assert code != 0
    log = worker.log_path.read_text(errors="replace")
    assert "VS_MODEL_PATH" in log and "VS_ENGINE=replay" in log, worker.log_tail()


def test_a_worker_restarted_after_sigkill_resumes_within_15_seconds(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    count = 400
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_BATCH_SIZE="8",
        VS_REPLAY_LATENCY_S="0.1",
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
    first = WorkerProcess(env, tmp_path / "worker-1.log")
    collect(kafka_bootstrap, wanted, lambda r: len(r[decisions_topic]) >= 40, timeout=120)
    first.kill()
    restarted_at = time.monotonic()
    second = WorkerProcess(env, tmp_path / "worker-2.log")
    try:
        while '"event": "outcome"' not in second.log_path.read_text(errors="replace"):
            assert time.monotonic() - restarted_at < 90, second.log_tail()
            time.sleep(0.1)
        recovery_s = time.monotonic() - restarted_at
        print(f"first output {recovery_s:.1f} s after the restart")
        records = collect(
            kafka_bootstrap,
            wanted,
            lambda r: {source_of(wanted[t], x) for t in wanted for x in r[t]} >= set(positions),
            timeout=180,
        )
    finally:
        second.stop()
    assert recovery_s < 15, f"first output {recovery_s:.1f} s after restart:\n{second.log_tail()}"
    seen = {source_of("verification-decision", x) for x in records[decisions_topic]}
    assert seen >= set(positions), f"{len(set(positions) - seen)} inputs lost"
