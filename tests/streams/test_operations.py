"""Operations on the real broker: metrics, readiness, graceful shutdown, scale-out."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.codecs import Codecs
from streams.kafka_admin import ensure_topics, wait_for_lag_zero
from tests.conftest import REPO, WorkerProcess
from tests.streams.test_sink_broker import all_topics, counts, sink_env
from tests.streams.test_worker_broker import record_outputs, worker_env
from tests.support.events import pickup_event, valid_answer
from tests.support.kafka_io import collect, produce, source_of

pytestmark = pytest.mark.broker


def http_get(port: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def _logged(worker: WorkerProcess, text: str) -> bool:
    return text in worker.log_path.read_text(errors="replace")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_readiness_and_info_after_known_events(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_LAG_REFRESH_S="1",
        VS_CLICKHOUSE_DSN="http://analyst:hunter2@127.0.0.1:1/db",
    )
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    events = [pickup_event(n) for n in range(3)]
    recorded = [[valid_answer()], ["not json", "still {not json"], [valid_answer()]]
    (tmp_path / "outputs.jsonl").write_text(
        "".join(
            json.dumps({"uuid": e["uuid"], "model_outputs": r}) + "\n"
            for e, r in zip(events, recorded, strict=True)
        )
    )
    codec = Codecs().for_schema("pickup-completed")
    pickups = env["VS_TOPIC_PICKUP_COMPLETED"]
    produce(
        kafka_bootstrap, pickups, [(None, codec.encode(e)) for e in events] + [(None, b"\x07junk")]
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    port = env["VS_WEB_PORT"]
    try:
        wait_until(lambda: http_get(port, "/readyz")[0] == 200, 120, "readiness")
        _, body = http_get(port, "/readyz")
        assert json.loads(body)["checks"] == {
            "broker_connected": True,
            "partitions_assigned": True,
            "models_loaded": True,
            "sink_reachable": True,
            "sink_accepting_rows": True,
        }
        assert wait_for_lag_zero(kafka_bootstrap, f"test-{unique}", [pickups], 60)
        wait_until(
            lambda: samples(http_get(port, "/metrics")[1], "visionstream_events_out_total") != {},
            30,
            "metrics",
        )
        metrics = http_get(port, "/metrics")[1]
        assert samples(metrics, "visionstream_events_in_total") == {(("topic", pickups),): 4.0}
        out = samples(metrics, "visionstream_events_out_total")
        assert out[(("topic", env["VS_TOPIC_VERIFICATION_DECISION"]),)] == 2.0
        assert (
            out[(("topic", env["VS_TOPIC_DEAD_LETTER"]),)] == 2.0
        )  # the junk and the twice-invalid answer
        dead = samples(metrics, "visionstream_dead_letters_total")
        assert {dict(k)["code"]: v for k, v in dead.items()} == {"1002": 1.0, "1301": 1.0}
        assert sum(samples(metrics, "visionstream_model_failures_total").values()) == 1.0

        def lag_settled() -> bool:
            lag = samples(http_get(port, "/metrics")[1], "visionstream_consumer_lag")
            return bool(lag) and all(v == 0 for v in lag.values())

        wait_until(lag_settled, 30, "consumer lag 0 in the metrics")
        info_status, info = http_get(port, "/info")
        assert info_status == 200 and "hunter2" not in info
        assert json.loads(info)["models"]["verification"] == "replay:recorded-outputs"
        assert http_get(port, "/healthz")[0] == 200
    finally:
        worker.stop()
    log_lines = [
        json.loads(line)
        for line in worker.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    outcomes = [line for line in log_lines if line.get("event") == "outcome"]
    assert Counter(line["outcome"] for line in outcomes) == {"Pick": 2, "dead_letter": 2}
    assert all("iVBOR" not in json.dumps(line) for line in log_lines)  # no base64 image bodies


@pytest.mark.slow
def test_readiness_flips_with_the_broker(
    unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    port = 19392
    broker_env = {
        **os.environ,
        "KAFKA_HOME_DIR": str(tmp_path / "kafka"),
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(port + 1),
    }
    script = str(REPO / "scripts" / "kafka")
    bootstrap = f"127.0.0.1:{port}"
    env = worker_env(bootstrap, unique, tmp_path, categorizer_artifacts, VS_LAG_REFRESH_S="1")
    (tmp_path / "outputs.jsonl").write_text("")
    web = env["VS_WEB_PORT"]
    worker: WorkerProcess | None = None
    try:
        subprocess.run(
            [script, "start"], env=broker_env, check=True, capture_output=True, timeout=300
        )
        ensure_topics(bootstrap, all_topics(env), 2)
        worker = WorkerProcess(env, tmp_path / "worker.log")
        wait_until(lambda: http_get(web, "/readyz")[0] == 200, 180, "ready with the broker up")
        subprocess.run(
            [script, "stop"], env=broker_env, check=True, capture_output=True, timeout=120
        )
        wait_until(lambda: http_get(web, "/readyz")[0] == 503, 60, "not ready with the broker down")
        assert json.loads(http_get(web, "/readyz")[1])["checks"]["broker_connected"] is False
        subprocess.run(
            [script, "start"], env=broker_env, check=True, capture_output=True, timeout=300
        )
        wait_until(lambda: http_get(web, "/readyz")[0] == 200, 180, "ready again")
    finally:
        if worker is not None:
            worker.stop()
        subprocess.run([script, "stop"], env=broker_env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_graceful_shutdown_acknowledges_the_batch_in_flight(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    count = 240
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_BATCH_SIZE="8",
        VS_REPLAY_LATENCY_S="0.2",
    )
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    events = [pickup_event(n) for n in range(count)]
    record_outputs(
        tmp_path / "outputs.jsonl", [e["uuid"] for e in events], [valid_answer()] * count
    )
    codec = Codecs().for_schema("pickup-completed")
    positions = produce(
        kafka_bootstrap, env["VS_TOPIC_PICKUP_COMPLETED"], [(None, codec.encode(e)) for e in events]
    )
    decisions = env["VS_TOPIC_VERIFICATION_DECISION"]
    wanted = {decisions: "verification-decision"}
    first = WorkerProcess(env, tmp_path / "worker-1.log")
    collect(kafka_bootstrap, wanted, lambda r: len(r[decisions]) >= 24, timeout=120)
    started = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(60) == 0, first.log_tail()
    assert time.monotonic() - started < 30
    snapshot = collect(kafka_bootstrap, wanted, lambda r: False, timeout=4)
    assert len(snapshot[decisions]) < count, "the worker finished everything before the stop"
    second = WorkerProcess(env, tmp_path / "worker-2.log")
    try:
        records = collect(
            kafka_bootstrap, wanted, lambda r: len(r[decisions]) >= count, timeout=180
        )
    finally:
        second.stop()
    per_input = Counter(source_of("verification-decision", r) for r in records[decisions])
    assert set(per_input) == set(positions)
    assert max(per_input.values()) == 1, "an input was redelivered after a clean stop"


def test_a_second_sigterm_exits_at_once(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    env = worker_env(
        kafka_bootstrap,
        unique,
        tmp_path,
        categorizer_artifacts,
        VS_BATCH_SIZE="4",
        VS_REPLAY_LATENCY_S="30",
        VS_SHUTDOWN_TIMEOUT_S="120",
    )
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    events = [pickup_event(n) for n in range(4)]
    record_outputs(tmp_path / "outputs.jsonl", [e["uuid"] for e in events], [valid_answer()] * 4)
    codec = Codecs().for_schema("pickup-completed")
    produce(
        kafka_bootstrap, env["VS_TOPIC_PICKUP_COMPLETED"], [(None, codec.encode(e)) for e in events]
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        # A batch is in flight for 30 s (simulated model latency) once the agent has it.
        wait_until(
            lambda: (
                "batch_size" in http_get(env["VS_WEB_PORT"], "/metrics")[1]
                and samples(
                    http_get(env["VS_WEB_PORT"], "/metrics")[1], "visionstream_batch_size_count"
                )
                != {}
            ),
            120,
            "a batch in flight",
        )
        worker.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert worker.process.poll() is None, "the first SIGTERM must wait for the batch in flight"
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        code = worker.process.wait(15)
        assert time.monotonic() - started < 10
        assert code == 128 + signal.SIGTERM
    finally:
        worker.stop()


@pytest.mark.slow
def test_two_workers_share_partitions_and_one_takes_over(
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
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    events = [pickup_event(n) for n in range(count)]
    record_outputs(
        tmp_path / "outputs.jsonl", [e["uuid"] for e in events], [valid_answer()] * count
    )
    sink = sink_env(env, tmp_path)
    second_env = {**env, "VS_WEB_PORT": str(int(env["VS_WEB_PORT"]) + 2)}
    workers = [
        WorkerProcess(env, tmp_path / "worker-a.log"),
        WorkerProcess(second_env, tmp_path / "worker-b.log"),
    ]
    sink_worker = WorkerProcess(sink, tmp_path / "sink.log")
    decisions = env["VS_TOPIC_VERIFICATION_DECISION"]
    wanted = {decisions: "verification-decision"}

    def outcomes(worker: WorkerProcess) -> int:
        return worker.log_path.read_text(errors="replace").count('"event": "outcome"')

    try:
        for worker in workers:
            wait_until(
                functools.partial(_logged, worker, "models loaded"),
                120,
                "start-up",
            )
        codec = Codecs().for_schema("pickup-completed")
        positions = produce(
            kafka_bootstrap,
            env["VS_TOPIC_PICKUP_COMPLETED"],
            [(e["shippingid"].encode(), codec.encode(e)) for e in events],
        )
        wait_until(lambda: all(outcomes(w) >= 8 for w in workers), 120, "both workers processing")
        workers[0].kill()
        records = collect(
            kafka_bootstrap,
            wanted,
            lambda r: (
                {source_of("verification-decision", x) for x in r[decisions]} >= set(positions)
            ),
            timeout=240,
        )
        assert {source_of("verification-decision", x) for x in records[decisions]} >= set(
            positions
        ), workers[1].log_tail()
        assert wait_for_lag_zero(kafka_bootstrap, f"test-{unique}-sink", all_topics(env), 120), (
            sink_worker.log_tail()
        )
    finally:
        workers[1].stop()
        sink_worker.stop()
    got = counts(sink)
    assert got["verification_decisions"] == count and got["pickup_requests"] == count, got
    report = [
        json.loads(line)
        for line in subprocess.run(
            [
                str(REPO / ".venv" / "bin" / "python"),
                "-m",
                "streams",
                "report",
                "decisions_per_day",
                "--since",
                "3650d",
                "--json",
            ],
            env={**os.environ, **sink},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.splitlines()
        if line.startswith("{")
    ][-1]
    assert sum(int(row["decisions"]) for row in report["rows"]) == count
