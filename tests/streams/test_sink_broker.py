"""The analytics sink on the real local broker with the embedded ClickHouse (chDB).

Workers run as real processes; ClickHouse is read afterwards through
`python -m streams query --json` (chDB allows one engine path per process).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from processors.records import Analysis, QuestionAnswer, SourcePosition, VerificationDecision
from streams.codecs import Codecs
from streams.kafka_admin import ensure_topics, group_lag, wait_for_lag_zero
from tests.conftest import WorkerProcess, streams_cli
from tests.streams.test_worker_broker import record_outputs, worker_env
from tests.support.events import pickup_event, product_event, valid_answer
from tests.support.kafka_io import produce

pytestmark = pytest.mark.broker

TABLES = [
    "pickup_requests",
    "inference_attempts",
    "verification_decisions",
    "question_answers",
    "product_listings",
    "category_tags",
    "dead_letters",
]


def query(env: dict[str, str], sql: str) -> list[dict[str, Any]]:
    out = streams_cli(env, "query", "--json", sql)
    last = [line for line in out.splitlines() if line.strip().startswith("{")][-1]
    rows: list[dict[str, Any]] = json.loads(last)["rows"]
    return rows


def counts(env: dict[str, str]) -> dict[str, int]:
    sql = " UNION ALL ".join(f"SELECT '{t}' AS t, count() AS n FROM {t} FINAL" for t in TABLES)
    return {row["t"]: int(row["n"]) for row in query(env, sql)}


def all_topics(env: dict[str, str]) -> list[str]:
    return [v for k, v in env.items() if k.startswith("VS_TOPIC_")]


def sink_env(base: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **base,
        "VS_ROLE": "sink",
        "VS_STATE_DIR": str(tmp_path / "sink-state"),
        "VS_SINK_MAX_ROWS": "50",
        "VS_SINK_MAX_INTERVAL_S": "0.3",
        "VS_WEB_PORT": str(int(base["VS_WEB_PORT"]) + 1),
    }


def readyz(port: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def decision_event(n: int, topic: str) -> dict[str, Any]:
    return VerificationDecision(
        shippingid=f"SHP-{n:05d}",
        uuid=f"req-{n:05d}",
        product_id=f"P-{n % 7}",
        questions=(
            QuestionAnswer("boolean", "Is it blue?", "true", "Yes", "Yes", "blue", 90.0, "false"),
        ),
        ai_decision="Pick" if n % 3 else "Not Pick",
        final_action="Pick" if n % 3 else "Not Pick",
        ai_match_score=80.0,
        analysis=Analysis("a", "b", "c"),
        status="success",
        status_code=200 if n % 3 else 202,
        processing_time_ai=0.5,
        total_time=0.9,
        timestamp="2026-11-22T10:00:00+00:00",
        model_version="replay",
        recommendation="Accept",
        idempotency_key=f"key-{n:05d}",
        source=SourcePosition(topic, 0, n),
    ).to_event()


def test_every_table_gets_its_rows(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    env = worker_env(kafka_bootstrap, unique, tmp_path, categorizer_artifacts)
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    pickups = [pickup_event(n) for n in range(3)]
    (tmp_path / "outputs.jsonl").write_text(
        "".join(
            json.dumps({"uuid": p["uuid"], "model_outputs": o}) + "\n"
            for p, o in zip(
                pickups,
                [
                    [valid_answer("Accept")],
                    [valid_answer("Reject", colour="No")],
                    ["no json here", "{still: not"],
                ],
                strict=True,
            )
        )
    )
    codec = Codecs().for_schema("pickup-completed")
    produce(
        kafka_bootstrap,
        env["VS_TOPIC_PICKUP_COMPLETED"],
        [(p["shippingid"].encode(), codec.encode(p)) for p in pickups] + [(b"junk", b"\x07junk")],
    )
    products = Codecs().for_schema("product-listed")
    produce(
        kafka_bootstrap,
        env["VS_TOPIC_PRODUCT_LISTED"],
        [(b"p", products.encode(product_event(n))) for n in range(2)],
    )
    sink = sink_env(env, tmp_path)
    workers = [
        WorkerProcess(env, tmp_path / "inference.log"),
        WorkerProcess(sink, tmp_path / "sink.log"),
    ]
    try:
        assert wait_for_lag_zero(
            kafka_bootstrap,
            f"test-{unique}",
            [env["VS_TOPIC_PICKUP_COMPLETED"], env["VS_TOPIC_PRODUCT_LISTED"]],
            150,
        ), workers[0].log_tail()
        assert wait_for_lag_zero(kafka_bootstrap, f"test-{unique}-sink", all_topics(env), 90), (
            workers[1].log_tail()
        )
        # While the sink owns the embedded database, reports come from its web server.
        with urllib.request.urlopen(
            f"http://127.0.0.1:{sink['VS_WEB_PORT']}/reports/decisions_per_day?since=3650d",
            timeout=30,
        ) as response:
            served = json.loads(response.read())
        assert sum(int(row["decisions"]) for row in served["rows"]) == 2, served
    finally:
        for worker in workers:
            worker.stop()
    got = counts(sink)
    assert got == {
        "pickup_requests": 3,
        "inference_attempts": 4,
        "verification_decisions": 2,
        "question_answers": 6,
        "product_listings": 2,
        "category_tags": 2,
        "dead_letters": 2,
    }, got
    dead = query(sink, "SELECT error_code FROM dead_letters FINAL ORDER BY error_code")
    assert [int(r["error_code"]) for r in dead] == [1002, 1301]
    # The named reports read the same data.
    report = json.loads(
        [
            line
            for line in streams_cli(
                sink, "report", "decisions_per_day", "--since", "3650d", "--json"
            ).splitlines()
            if line.startswith("{")
        ][-1]
    )
    assert sum(int(r["decisions"]) for r in report["rows"]) == 2, report


@pytest.mark.slow
def test_sink_sigkill_mid_stream_stores_each_record_once(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    env = worker_env(kafka_bootstrap, unique, tmp_path, categorizer_artifacts)
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    topic = env["VS_TOPIC_VERIFICATION_DECISION"]
    codec = Codecs().for_schema("verification-decision")
    produce(
        kafka_bootstrap,
        topic,
        [(None, codec.encode(decision_event(n, topic))) for n in range(1000)],
    )
    sink = {**sink_env(env, tmp_path), "VS_SINK_MAX_ROWS": "20", "VS_SINK_MAX_INTERVAL_S": "0.1"}
    group = f"test-{unique}-sink"
    first = WorkerProcess(sink, tmp_path / "sink-1.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        remaining = sum(group_lag(kafka_bootstrap, group, [topic]).values())
        if remaining < 1000:
            break
        time.sleep(0.2)
    first.kill()
    assert 0 < sum(group_lag(kafka_bootstrap, group, [topic]).values()) < 1000, first.log_tail()
    second = WorkerProcess(sink, tmp_path / "sink-2.log")
    try:
        assert wait_for_lag_zero(kafka_bootstrap, group, [topic], 120), second.log_tail()
    finally:
        second.stop()
    rows = query(
        sink,
        "SELECT count() AS n, uniqExact(idempotency_key) AS k FROM verification_decisions FINAL",
    )
    assert rows == [{"n": 1000, "k": 1000}], rows


@pytest.mark.slow
def test_outage_stops_acks_while_decisions_flow_then_recovers_exactly_once(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    env = worker_env(kafka_bootstrap, unique, tmp_path, categorizer_artifacts)
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    events = [pickup_event(n) for n in range(40)]
    record_outputs(tmp_path / "outputs.jsonl", [e["uuid"] for e in events], [valid_answer()] * 40)
    flag = tmp_path / "clickhouse-down"
    sink = {**sink_env(env, tmp_path), "VS_TEST_OUTAGE_FLAG": str(flag), "VS_LAG_REFRESH_S": "1"}
    sink_worker = WorkerProcess(
        sink, tmp_path / "sink.log", module="tests.support.outage_sink_worker"
    )
    deadline = time.monotonic() + 90
    while "analytics sink ready" not in sink_worker.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, sink_worker.log_tail()
        time.sleep(0.3)
    flag.touch()  # ClickHouse goes away once the sink is up
    inference = WorkerProcess(env, tmp_path / "inference.log")
    codec = Codecs().for_schema("pickup-completed")
    decisions = env["VS_TOPIC_VERIFICATION_DECISION"]
    try:
        produce(
            kafka_bootstrap,
            env["VS_TOPIC_PICKUP_COMPLETED"],
            [(None, codec.encode(e)) for e in events],
        )
        # Decisions keep flowing during the outage: the inference group drains its input.
        assert wait_for_lag_zero(
            kafka_bootstrap, f"test-{unique}", [env["VS_TOPIC_PICKUP_COMPLETED"]], 150
        ), inference.log_tail()
        time.sleep(3)  # several sink flush attempts fail meanwhile
        lag = sum(group_lag(kafka_bootstrap, f"test-{unique}-sink", [decisions]).values())
        assert lag >= 40, (
            f"the sink acknowledged during the outage (lag {lag})\n{sink_worker.log_tail()}"
        )
        assert "ClickHouse unavailable" in sink_worker.log_path.read_text()
        status, body = readyz(sink["VS_WEB_PORT"])
        assert status == 503 and json.loads(body)["checks"]["sink_reachable"] is False, body
        flag.unlink()
        assert wait_for_lag_zero(kafka_bootstrap, f"test-{unique}-sink", all_topics(env), 120), (
            sink_worker.log_tail()
        )
        deadline = time.monotonic() + 60
        while readyz(sink["VS_WEB_PORT"])[0] != 200:
            assert time.monotonic() < deadline, readyz(sink["VS_WEB_PORT"])
            time.sleep(0.5)
    finally:
        inference.stop()
        sink_worker.stop()
    got = counts(sink)
    assert got["verification_decisions"] == 40 and got["pickup_requests"] == 40, got
    raw = query(sink, "SELECT count() AS n FROM verification_decisions")
    assert raw == [{"n": 40}], raw  # no duplicates even before merges


def test_a_backfill_spanning_240_months_is_stored_whole_with_its_kafka_timestamps(
    kafka_bootstrap: str, unique: str, tmp_path: Path, categorizer_artifacts: Path
) -> None:
    """240 valid pickups, one a month for 20 years, in one partition: one insert block.

    ClickHouse refuses a block over 100 month partitions (code 252); before the split
    the sink retried that forever. Each message carries its own Kafka timestamp, which
    the sink stores (kafka_time, version) instead of its own clock.
    """
    from confluent_kafka import Producer

    from tests.processors.analytics.test_rejections import backfill_pickup

    env = worker_env(kafka_bootstrap, unique, tmp_path, categorizer_artifacts)
    ensure_topics(kafka_bootstrap, all_topics(env), 4)
    topic = env["VS_TOPIC_PICKUP_COMPLETED"]
    codec = Codecs().for_schema("pickup-completed")
    kafka_ts = 1_717_199_999_000  # 2024-05-31T23:59:59Z
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50})
    for n in range(240):
        producer.produce(
            topic, codec.encode(backfill_pickup(n)), partition=0, timestamp=kafka_ts + n
        )
    assert producer.flush(60) == 0
    sink = {**sink_env(env, tmp_path), "VS_SINK_MAX_ROWS": "500", "VS_SINK_MAX_INTERVAL_S": "3"}
    worker = WorkerProcess(sink, tmp_path / "sink.log")
    try:
        assert wait_for_lag_zero(kafka_bootstrap, f"test-{unique}-sink", all_topics(env), 120), (
            worker.log_tail()
        )
        deadline = time.monotonic() + 60
        while readyz(sink["VS_WEB_PORT"])[0] != 200:
            assert time.monotonic() < deadline, readyz(sink["VS_WEB_PORT"])
            time.sleep(0.5)
    finally:
        worker.stop()
    rows = query(
        sink,
        "SELECT count() AS n, uniqExact(toYYYYMM(event_time)) AS months, "
        "min(version) AS lo, max(version) AS hi, "
        "countIf(toUnixTimestamp64Milli(kafka_time) = version) AS same FROM pickup_requests FINAL",
    )
    got = {k: int(v) for k, v in rows[0].items()}
    assert got == {"n": 240, "months": 240, "lo": kafka_ts, "hi": kafka_ts + 239, "same": 240}
    failures = query(sink, "SELECT count() AS n FROM sink_failures")
    assert int(failures[0]["n"]) == 0
    # The block really was refused for its partitions, then stored in parts.
    assert "(code 252); inserting them in" in (tmp_path / "sink.log").read_text()
