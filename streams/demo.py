"""The end-to-end demo behind the README's first command.

Starts the local broker (scripts/kafka), an inference worker and the analytics sink
(two processes, two consumer groups), produces the sample events plus one malformed
message, prints every decision, tag and dead letter that comes back, waits until
the sink has stored everything, then stops the inference worker. The sink keeps
running so that the review page (docs/review.md) shows the demo's decisions; the demo
prints its address and a per-run reviewer password, and stops it at its next start.

With no `VS_MODEL_PATH`, the demo asks for the replay engine (`VS_ENGINE=replay`): the
samples' recorded model outputs stand in for the VLM, and the demo says so.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from streams.codecs import Codecs
from streams.kafka_admin import bootstrap_servers, ensure_topics, source_of, wait_for_lag_zero
from streams.settings import SAMPLES_DIR, Settings

REPO_DIR = Path(__file__).resolve().parents[1]


def _say(text: str) -> None:
    print(text, flush=True)


def _start_broker(settings: Settings) -> None:
    script = REPO_DIR / "scripts" / "kafka"
    if settings.broker != Settings().broker or not script.is_file():
        _say(f"using the broker at {bootstrap_servers(settings.broker)}")
        return
    subprocess.run([str(script), "start"], check=True)


def _ensure_categorizer(settings: Settings) -> None:
    artifacts = settings.categorizer_artifacts
    if artifacts is not None and (artifacts / "manifest.json").is_file():
        return
    from streams.training import SAMPLE_TRAINING_CSV, train

    _say(f"training the categorizer on the in-repo sample set → {artifacts} (once)")
    assert artifacts is not None
    train(settings, SAMPLE_TRAINING_CSV, artifacts, image_encoder=settings.image_encoder)


def _start_worker(
    settings: Settings, role: str, log_dir: Path, **extra_env: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VS_ROLE": role, "VS_STATE_DIR": str(settings.state_dir), **extra_env}
    if settings.categorizer_artifacts is not None:
        env["VS_CATEGORIZER_ARTIFACTS"] = str(settings.categorizer_artifacts)
    if settings.model_path is None and not settings.engine:
        env["VS_ENGINE"] = "replay"  # a worker never falls back to replay on its own
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = (log_dir / f"{role}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "streams", "worker", "-l", "info"],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=os.getcwd(),
        start_new_session=True,  # the sink outlives the demo (the review page stays up)
    )


def _review_login(settings: Settings) -> tuple[str, str, dict[str, str]]:
    """The reviewer the demo's sink accepts: the configured one, else a fresh random password.

    There is no default password: the demo makes one per run and prints it.
    """
    if settings.review.users:
        name, password = settings.review.users[0]
        return name, password, {}
    password = secrets.token_urlsafe(12)
    return "demo", password, {"VS_REVIEW_USERS": f"demo:{password}"}


def _stop_previous_sink(pid_file: Path) -> None:
    """Stop the sink a previous demo left running (it holds the database and the port)."""
    try:
        pid = int(pid_file.read_text().strip())
        # A recycled pid belongs to some other program: only a streams worker is stopped.
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    if b"streams" not in command or b"worker" not in command:
        pid_file.unlink(missing_ok=True)
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return
    _say(f"stopping the review sink of the previous demo (pid {pid})")
    for _ in range(60):
        time.sleep(0.5)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
    pid_file.unlink(missing_ok=True)


def _read_samples(name: str) -> list[dict[str, Any]]:
    lines = (SAMPLES_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _produce(settings: Settings, run_id: str) -> set[tuple[str, int, int]]:
    """Produce the samples; returns the source positions the outputs will point back to."""
    codecs = Codecs(settings.schema_registry_url)
    producer = Producer({"bootstrap.servers": bootstrap_servers(settings.broker), "linger.ms": 5})
    positions: set[tuple[str, int, int]] = set()

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            raise RuntimeError(f"delivery failed: {err}")
        positions.add((msg.topic(), msg.partition(), msg.offset()))

    topics = settings.topics
    for event in _read_samples("pickup_events.jsonl"):
        event = {**event, "event_id": f"{event.get('event_id', 'pickup')}-{run_id}"}
        value = codecs.for_schema("pickup-completed").encode(event)
        producer.produce(
            topics.pickup_completed, value, key=event["shippingid"], on_delivery=delivered
        )
    for event in _read_samples("product_events.jsonl"):
        event = {**event, "event_id": f"{event.get('event_id', 'product')}-{run_id}"}
        value = codecs.for_schema("product-listed").encode(event)
        producer.produce(
            topics.product_listed, value, key=event["product_id"], on_delivery=delivered
        )
    # One malformed message: it must reach the dead-letter topic, and the rest flow on.
    producer.produce(
        topics.pickup_completed, b"\x07not an event", key=b"demo-junk", on_delivery=delivered
    )
    if producer.flush(30) != 0:
        raise RuntimeError("the broker did not acknowledge the sample events")
    return positions


def _collect(
    settings: Settings, expected: set[tuple[str, int, int]], timeout: float
) -> dict[str, list[dict[str, Any]]]:
    codecs = Codecs(settings.schema_registry_url)
    topics = settings.topics
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers(settings.broker),
            "group.id": f"visionstream-demo-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    outputs = [topics.verification_decision, topics.category_tag, topics.dead_letter]
    consumer.subscribe(outputs)
    seen: dict[str, list[dict[str, Any]]] = {topic: [] for topic in outputs}
    remaining = set(expected)
    deadline = time.monotonic() + timeout
    try:
        while remaining and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            topic = str(message.topic())
            record = codecs.for_schema(topics.schema_of(topic)).decode(message.value())
            source = source_of(topics.schema_of(topic), record)
            if source in remaining:
                remaining.discard(source)
                seen[topic].append(record)
    finally:
        consumer.close()
    if remaining:
        _say(f"!! {len(remaining)} inputs got no output within {timeout:.0f}s")
    return seen


def _print_outputs(settings: Settings, seen: dict[str, list[dict[str, Any]]]) -> None:
    topics = settings.topics
    _say("\n== verification-decision")
    for d in sorted(seen[topics.verification_decision], key=lambda r: r["shippingid"]):
        answers = "; ".join(f"{q['Label']} → {q['answer'] or '∅'}" for q in d["Question"])
        _say(
            f"{d['shippingid']:<10} {d['ai_decision']:<9} {d['StatusCode']}  score {d['ai_match_score']:>5.1f}  "
            f"({d['recommendation']})  {answers}"
        )
    _say("\n== category-tag")
    for t in sorted(seen[topics.category_tag], key=lambda r: r["product_id"]):
        top = ", ".join(f"{c['category']} {c['prob']:.2f}" for c in t["top_categories"])
        _say(
            f"{t['product_id']:<10} {t['category']:<12} {t['score']:.2f}  top3: {top}  tags: {', '.join(t['tags'])}"
        )
    _say("\n== dead-letter")
    for dl in seen[topics.dead_letter]:
        who = (
            dl.get("shippingid")
            or f"{dl['source_topic']}@{dl['source_partition']}:{dl['source_offset']}"
        )
        _say(f"{who:<10} {dl['error_code']} {dl['error_name']}: {dl['error_message'][:110]}")


def _stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_demo(settings: Settings, *, timeout: float = 180.0, keep_running: bool = False) -> int:
    """Run the demo; returns a process exit code (0 when every input got an output)."""
    if settings.engine == "replay" or settings.model_path is None:
        _say(
            "verification engine: REPLAY — recorded model outputs from "
            f"{settings.replay_outputs} stand in for the VLM (set VS_MODEL_PATH to run a real model)"
        )
    _start_broker(settings)
    bootstrap = bootstrap_servers(settings.broker)
    all_topics = list(settings.topics.all())
    ensure_topics(bootstrap, all_topics, settings.topic_partitions)
    _ensure_categorizer(settings)
    log_dir = settings.state_dir / "logs"
    pid_file = settings.state_dir / "sink.pid"
    _stop_previous_sink(pid_file)
    reviewer, password, review_env = _review_login(settings)
    workers = [
        _start_worker(settings, "inference", log_dir),
        _start_worker(settings, "sink", log_dir, **review_env),
    ]
    # The sink listens on VS_WEB_PORT when set (both workers then share it), else 6067.
    sink_port = settings.web_port if settings.web_port != Settings().web_port else 6067
    _say(f"workers started (logs in {log_dir}); producing the sample events")
    try:
        expected = _produce(settings, uuid.uuid4().hex[:8])
        seen = _collect(settings, expected, timeout)
        _print_outputs(settings, seen)
        got = sum(len(v) for v in seen.values())
        _say(f"\n{got} of {len(expected)} inputs produced an output")
        for process in workers:
            if process.poll() is not None:
                _say(f"!! a worker exited early with code {process.returncode}; see {log_dir}")
        caught_up = wait_for_lag_zero(bootstrap, settings.sink_app_id, all_topics, timeout=60)
        _say(
            "analytics sink: all stored in ClickHouse"
            if caught_up
            else "!! analytics sink lags behind"
        )
        ok = got == len(expected) and caught_up
        if ok and workers[1].poll() is None:
            pid_file.write_text(str(workers[1].pid))
            _say(
                f"\nreview page: http://127.0.0.1:{sink_port}/review  "
                f"user {reviewer}  password {password}\n"
                f"the sink keeps running for it (reports: http://127.0.0.1:{sink_port}/review/accuracy); "
                f"stop it with `kill $(cat {pid_file})`, then `python -m streams report` "
                "prints the outcome reports"
            )
        return 0 if ok else 1
    finally:
        leave = {workers[1].pid} if pid_file.is_file() else set()
        for process in workers:
            if not keep_running and process.pid not in leave:
                _stop(process)
