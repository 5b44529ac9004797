"""Return verification on the real broker with a real (tiny, random) InternVL.

The worker loads a tiny checkpoint in the original InternVLChatModel layout through
the production loading code, fetches vendor images over HTTP from a local server,
tiles them and runs batched generation on CPU.

With constrained decoding (the default), even a random model's answers are valid on the
first attempt, so every request with images ends as a decision. With
`VS_CONSTRAINED_DECODING=0` a random model's answers are not valid JSON, so every request
must go through the retry and end as a coded dead letter with both raw outputs and two
recorded attempts: nothing is lost or silent.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from streams.codecs import Codecs
from streams.kafka_admin import ensure_topics
from tests.conftest import WorkerProcess
from tests.streams.test_sink_broker import all_topics
from tests.streams.test_worker_broker import worker_env
from tests.support.events import QUESTIONS, pickup_event
from tests.support.kafka_io import collect, produce, source_of
from tests.support.tiny_internvl import build_tiny_original_internvl

pytestmark = pytest.mark.broker


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "www"
    root.mkdir()
    Image.new("RGB", (640, 480), (30, 60, 200)).save(root / "vendor.jpg", quality=90)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_tiny_internvl_end_to_end_records_retries_and_loses_nothing(
    kafka_bootstrap: str,
    unique: str,
    tmp_path: Path,
    categorizer_artifacts: Path,
    image_server: str,
) -> None:
    model = build_tiny_original_internvl(tmp_path / "tiny-internvl")
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_ENGINE="internvl",
        VS_MODEL_PATH=str(model),
        VS_MAX_NEW_TOKENS="8",
        VS_BATCH_SIZE="4",
        VS_IMAGE_ALLOW_LOOPBACK="true",
        VS_IMAGE_RETRIES="0",
        VS_CONSTRAINED_DECODING="0",
        VS_ENGINE_MODE="static",  # one engine call serves the batch (checked below)
    )
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    events = [pickup_event(n, vendor_urls=[f"{image_server}/vendor.jpg"]) for n in range(3)]
    events.append(pickup_event(3, vendor_urls=[f"{image_server}/missing.jpg"]))
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
    dead = {d["shippingid"]: d for d in records[env["VS_TOPIC_DEAD_LETTER"]]}
    assert dead["SHP-00003"]["error_code"] == 1201 and dead["SHP-00003"]["stage"] == "gather"
    for n in range(3):
        letter = dead[f"SHP-{n:05d}"]
        assert letter["error_code"] == 1301, letter
        assert set(letter["extra"]) >= {"raw_output_1", "raw_output_2"}
    attempts = records[env["VS_TOPIC_VERIFICATION_ATTEMPTS"]]
    assert sorted((a["shippingid"], a["attempt"]) for a in attempts) == [
        (f"SHP-{n:05d}", k) for n in range(3) for k in (1, 2)
    ]
    assert all(
        a["validation_status"] == "invalid" and a["model_version"].startswith("internvl")
        for a in attempts
    )
    assert all(
        a["batch_size"] == 3 for a in attempts if a["attempt"] == 1
    )  # one call served the batch


def test_tiny_internvl_constrained_end_to_end_yields_decisions(
    kafka_bootstrap: str,
    unique: str,
    tmp_path: Path,
    categorizer_artifacts: Path,
    image_server: str,
) -> None:
    model = build_tiny_original_internvl(tmp_path / "tiny-internvl")
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_ENGINE="internvl",
        VS_MODEL_PATH=str(model),
        # The random model fills every free string to its bound: about 1,000 tokens.
        VS_MAX_NEW_TOKENS="3000",
        VS_BATCH_SIZE="4",
        VS_IMAGE_ALLOW_LOOPBACK="true",
        VS_IMAGE_RETRIES="0",
    )
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    events = [pickup_event(n, vendor_urls=[f"{image_server}/vendor.jpg"]) for n in range(3)]
    events.append(pickup_event(3, vendor_urls=[f"{image_server}/missing.jpg"]))
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
        records = collect(kafka_bootstrap, wanted, all_answered, timeout=400)
    finally:
        worker.stop()
    assert all_answered(records), worker.log_tail()
    dead = {d["shippingid"]: d for d in records[env["VS_TOPIC_DEAD_LETTER"]]}
    assert set(dead) == {"SHP-00003"} and dead["SHP-00003"]["error_code"] == 1201
    decisions = {d["shippingid"]: d for d in records[env["VS_TOPIC_VERIFICATION_DECISION"]]}
    assert set(decisions) == {f"SHP-{n:05d}" for n in range(3)}
    labels = [q["Label"] for q in QUESTIONS]
    for decision in decisions.values():
        assert decision["ai_decision"] in ("Pick", "Not Pick")
        assert [q["Label"] for q in decision["Question"]] == labels
    attempts = records[env["VS_TOPIC_VERIFICATION_ATTEMPTS"]]
    assert sorted((a["shippingid"], a["attempt"]) for a in attempts) == [
        (f"SHP-{n:05d}", 1) for n in range(3)
    ]  # no retry
    assert all(a["validation_status"] == "valid" for a in attempts)
    # The default engine mode puts the native engine on the slot engine: one submission each.
    assert all(a["batch_size"] == 1 for a in attempts)
