"""Observability: metrics (values and labels after known calls, the lag and GPU
collectors, isolation) and the structured, redacted logs of `streams.logs`."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import uuid
from collections.abc import Mapping
from types import ModuleType, SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

from processors.errors import ErrorCode
from streams.logs import JsonFormatter, TextFormatter, log_outcome, redact_text
from streams.metrics import PHASES, GpuMemoryCollector, Metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((f"visionstream_{name}", frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == f"visionstream_{name}"}


def test_known_sequence_of_calls_is_exported_with_labels_and_values() -> None:
    metrics = Metrics()
    metrics.count_in("pickup-completed", 3)
    metrics.count_in("pickup-completed")
    metrics.count_in("product-listed", 2)
    metrics.count_out("verification-decision", 3)
    metrics.count_dead_letter(1201, "IMAGE_DOWNLOAD_FAILED", "gather")
    metrics.count_dead_letter(ErrorCode.IMAGE_DOWNLOAD_FAILED, "IMAGE_DOWNLOAD_FAILED", "gather")
    metrics.count_dead_letter(1002, "UNDECODABLE_MESSAGE", "decode")
    metrics.observe_batch("verify-pickups", 3)
    metrics.observe_batch("verify-pickups", 40)
    metrics.observe_phase("model", 0.3)
    metrics.observe_phase("model", 12.0)
    metrics.count_retry()
    metrics.count_retry(2)
    metrics.count_model_failure(ErrorCode.MODEL_OUTPUT_INVALID)
    metrics.count_model_failure("MODEL_FAILED")
    metrics.count_image_error("IMAGE_TIMEOUT")
    metrics.count_image_error(ErrorCode.IMAGE_TIMEOUT)
    metrics.count_cache_hit(5)
    metrics.count_cache_miss()
    metrics.set_ready(True)

    s = scrape(metrics)
    assert value(s, "events_in_total", topic="pickup-completed") == 4
    assert value(s, "events_in_total", topic="product-listed") == 2
    assert value(s, "events_out_total", topic="verification-decision") == 3
    assert series(s, "dead_letters_total") == {
        frozenset({"code": "1201", "name": "IMAGE_DOWNLOAD_FAILED", "stage": "gather"}.items()): 2,
        frozenset({"code": "1002", "name": "UNDECODABLE_MESSAGE", "stage": "decode"}.items()): 1,
    }
    assert value(s, "batch_size_count", agent="verify-pickups") == 2
    assert value(s, "batch_size_sum", agent="verify-pickups") == 43
    assert value(s, "batch_size_bucket", agent="verify-pickups", le="4.0") == 1
    assert value(s, "batch_size_bucket", agent="verify-pickups", le="64.0") == 2
    assert value(s, "phase_seconds_count", phase="model") == 2
    assert value(s, "phase_seconds_sum", phase="model") == pytest.approx(12.3)
    assert value(s, "phase_seconds_bucket", phase="model", le="0.5") == 1
    assert value(s, "phase_seconds_bucket", phase="model", le="20.0") == 2
    assert value(s, "model_retries_total") == 3
    assert series(s, "model_failures_total") == {
        frozenset({("code", "MODEL_OUTPUT_INVALID")}): 1,
        frozenset({("code", "MODEL_FAILED")}): 1,
    }
    assert series(s, "image_errors_total") == {frozenset({("code", "IMAGE_TIMEOUT")}): 2}
    assert value(s, "vision_cache_hits_total") == 5
    assert value(s, "vision_cache_misses_total") == 1
    assert value(s, "worker_ready") == 1


def test_every_phase_is_exported_at_zero_before_any_observation() -> None:
    s = scrape(Metrics())
    for phase in PHASES:
        assert value(s, "phase_seconds_count", phase=phase) == 0
    assert value(s, "worker_ready") == 0


def test_time_phase_records_the_block_also_when_it_raises() -> None:
    metrics = Metrics()
    with metrics.time_phase("sink"):
        pass
    with pytest.raises(RuntimeError), metrics.time_phase("sink"):
        raise RuntimeError("ClickHouse down")
    s = scrape(metrics)
    assert value(s, "phase_seconds_count", phase="sink") == 2
    assert cast(float, value(s, "phase_seconds_sum", phase="sink")) >= 0


def test_unknown_phase_and_negative_counts_are_refused() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="unknown phase 'inference'"):
        metrics.observe_phase("inference", 1.0)
    with pytest.raises(ValueError, match="unknown phase"), metrics.time_phase("download"):
        pass
    with pytest.raises(ValueError, match="negative"):
        metrics.count_in("t", -1)
    with pytest.raises(ValueError, match="negative"):
        metrics.observe_batch("a", -2)


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.count_in("t", 7)
    assert value(scrape(first), "events_in_total", topic="t") == 7
    assert value(scrape(second), "events_in_total", topic="t") is None
    assert REGISTRY.get_sample_value("visionstream_events_in_total", {"topic": "t"}) is None


def test_openmetrics_is_rendered_when_asked_for() -> None:
    metrics = Metrics()
    metrics.count_out("category-tag", 2)
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(body.decode())}
    counter = families["visionstream_events_out"]
    assert counter.type == "counter"
    assert [(s.labels, s.value) for s in counter.samples if s.name.endswith("_total")] == [
        ({"topic": "category-tag"}, 2.0)
    ]


# ---------------------------------------------------------------------------- consumer lag


def lag_series(samples: Samples) -> dict[tuple[str, str, str], float]:
    """`consumer_lag` samples keyed by (group, topic, partition)."""
    return {
        (labels["group"], labels["topic"], labels["partition"]): v
        for labels, v in ((dict(k), v) for k, v in series(samples, "consumer_lag").items())
    }


async def test_refresh_lag_calls_the_injected_function_in_a_thread_and_replaces_lag() -> None:
    metrics = Metrics()
    loop_thread = threading.get_ident()
    calls: list[int] = []
    answers: list[Mapping[tuple[str, int], int]] = [
        {("pickup-completed", 0): 5, ("pickup-completed", 1): 0, ("product-listed", 3): 12},
        {("pickup-completed", 0): 1},
    ]

    def lag() -> Mapping[tuple[str, int], int]:
        calls.append(threading.get_ident())
        return answers[len(calls) - 1]

    assert await metrics.refresh_lag("visionstream", lag) is True
    assert calls and calls[0] != loop_thread
    assert lag_series(scrape(metrics)) == {
        ("visionstream", "pickup-completed", "0"): 5,
        ("visionstream", "pickup-completed", "1"): 0,
        ("visionstream", "product-listed", "3"): 12,
    }

    assert await metrics.refresh_lag("visionstream", lag) is True
    assert lag_series(scrape(metrics)) == {("visionstream", "pickup-completed", "0"): 1}


async def test_a_failing_lag_function_removes_only_its_groups_lag_and_is_counted() -> None:
    metrics = Metrics()
    await metrics.refresh_lag("visionstream-sink", lambda: {("dead-letter", 0): 4})
    await metrics.refresh_lag("visionstream", lambda: {("pickup-completed", 0): 9})

    def broken() -> Mapping[tuple[str, int], int]:
        raise RuntimeError("broker unreachable")

    assert await metrics.refresh_lag("visionstream", broken) is False
    s = scrape(metrics)
    assert lag_series(s) == {("visionstream-sink", "dead-letter", "0"): 4}
    assert value(s, "consumer_lag_refresh_failures_total", group="visionstream") == 1


async def test_refresh_lag_does_not_block_the_event_loop() -> None:
    metrics = Metrics()
    release = threading.Event()

    def slow_lag() -> Mapping[tuple[str, int], int]:
        release.wait(5)
        return {("t", 0): 1}

    refresh = asyncio.create_task(metrics.refresh_lag("g", slow_lag))
    await asyncio.sleep(0.05)
    assert not refresh.done()  # the loop ran this coroutine while lag() was waiting
    release.set()
    assert await refresh is True


# ---------------------------------------------------------------------------- GPU memory


def fake_torch(*, initialised: bool, allocated: list[int], reserved: list[int]) -> ModuleType:
    cuda = SimpleNamespace(
        is_initialized=lambda: initialised,
        device_count=lambda: len(allocated),
        memory_allocated=lambda i: allocated[i],
        memory_reserved=lambda i: reserved[i],
    )
    return cast(ModuleType, SimpleNamespace(cuda=cuda))


def gpu_samples(modules: Mapping[str, Any]) -> list[tuple[dict[str, str], float]]:
    collector = GpuMemoryCollector(cast(Mapping[str, ModuleType], modules))
    return [(s.labels, s.value) for family in collector.collect() for s in family.samples]


def test_gpu_collector_yields_nothing_without_torch_or_without_cuda() -> None:
    assert gpu_samples({}) == []
    assert gpu_samples({"torch": fake_torch(initialised=False, allocated=[1], reserved=[2])}) == []


def test_gpu_collector_reports_each_device_when_cuda_is_initialised() -> None:
    torch = fake_torch(initialised=True, allocated=[100, 300], reserved=[200, 400])
    assert gpu_samples({"torch": torch}) == [
        ({"device": "cuda:0", "kind": "allocated"}, 100.0),
        ({"device": "cuda:0", "kind": "reserved"}, 200.0),
        ({"device": "cuda:1", "kind": "allocated"}, 300.0),
        ({"device": "cuda:1", "kind": "reserved"}, 400.0),
    ]
    s = scrape(Metrics(gpu_modules={"torch": torch}))
    assert value(s, "gpu_memory_bytes", device="cuda:1", kind="reserved") == 400


def test_gpu_collector_swallows_errors_so_a_scrape_never_fails() -> None:
    def broken(index: int) -> int:
        raise RuntimeError("CUDA error: device lost")

    torch = fake_torch(initialised=True, allocated=[1], reserved=[1])
    torch.cuda.memory_allocated = broken
    assert gpu_samples({"torch": torch}) == []
    assert series(scrape(Metrics(gpu_modules={"torch": torch})), "gpu_memory_bytes") == {}


def test_gpu_collector_with_the_real_torch_and_no_cuda_work_yields_nothing() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_initialized():
        pytest.skip("CUDA was initialised by an earlier test in this process")
    assert gpu_samples({"torch": torch}) == []
    assert not torch.cuda.is_initialized()  # reading did not create a CUDA context


def test_gpu_collector_reports_real_cuda_allocations() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda:0")
    try:
        samples = dict(
            ((labels["device"], labels["kind"]), v) for labels, v in gpu_samples({"torch": torch})
        )
        assert samples[("cuda:0", "allocated")] >= block.numel()
        assert samples[("cuda:0", "reserved")] >= samples[("cuda:0", "allocated")]
    finally:
        del block


# ---------------------------------------------------------------------------- structured logs
# (streams.logs: the per-event outcome line and the redaction the formatters apply)

BASE64_BODY = base64.b64encode(bytes(range(256)) * 3).decode()  # 1024 chars, like an image


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    """A private logger writing through `formatter` into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.logs.{uuid.uuid4().hex}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_log_outcome_writes_one_json_line_with_every_field() -> None:
    logger, stream = capture(JsonFormatter())
    log_outcome(
        logger,
        request_uuid="req-1",
        shippingid="SHP-1",
        topic="pickup-completed",
        partition=2,
        offset=41,
        outcome="decision",
        timings={"gather": 120.4567, "model": 900.0},
    )
    log_outcome(
        logger,
        request_uuid=None,
        shippingid="SHP-2",
        topic="pickup-completed",
        partition=0,
        offset=7,
        outcome="dead_letter",
        code=int(ErrorCode.IMAGE_TIMEOUT),
    )
    first, second = json_lines(stream)
    assert first["level"] == "info"
    assert {k: first[k] for k in ("event", "request_uuid", "shippingid", "outcome")} == {
        "event": "outcome",
        "request_uuid": "req-1",
        "shippingid": "SHP-1",
        "outcome": "decision",
    }
    assert (first["topic"], first["partition"], first["offset"]) == ("pickup-completed", 2, 41)
    assert first["timings_ms"] == {"gather": 120.457, "model": 900.0}
    assert "code" not in first
    assert first["message"] == "decision pickup-completed@2:41 uuid=req-1 shippingid=SHP-1"
    assert second["level"] == "warning"
    assert (second["code"], second["code_name"]) == (1203, "IMAGE_TIMEOUT")
    assert second["request_uuid"] is None


def test_json_formatter_redacts_base64_bodies_and_url_passwords_everywhere() -> None:
    logger, stream = capture(JsonFormatter())
    try:
        raise ValueError(f"cannot decode {BASE64_BODY}")
    except ValueError:
        logger.exception(
            "fetch from https://svc:s3cr3t-pw@cdn.example.com/img failed; body %s",
            BASE64_BODY,
            extra={
                "context": {"image": f"data:image/jpeg;base64,{BASE64_BODY}", "n": 3},
                "dsn": "clickhouse://default:hunter2@db:8123/visionstream",
                "raw": BASE64_BODY.encode(),
                "short": "aGVsbG8=",
            },
        )
    line = stream.getvalue()
    assert BASE64_BODY[:250] not in line
    assert "s3cr3t-pw" not in line
    assert "hunter2" not in line
    (record,) = json_lines(stream)
    assert record["message"] == (
        "fetch from https://svc:***@cdn.example.com/img failed; body <redacted 1024 base64 chars>"
    )
    assert record["context"] == {
        "image": "data:image/jpeg;base64,<redacted 1024 base64 chars>",
        "n": 3,
    }
    assert record["dsn"] == "clickhouse://default:***@db:8123/visionstream"
    assert record["raw"] == "<1024 bytes>"
    assert record["short"] == "aGVsbG8="  # short values are not bodies
    assert "ValueError: cannot decode <redacted 1024 base64 chars>" in record["exception"]


def test_text_formatter_stays_human_readable_and_redacts_too() -> None:
    logger, stream = capture(TextFormatter())
    logger.warning("broker kafka://app:pw123@broker:9092 gave %s", BASE64_BODY)
    line = stream.getvalue().strip()
    assert line.endswith(
        "WARNING " + logger.name + ": broker kafka://app:***@broker:9092 gave "
        "<redacted 1024 base64 chars>"
    )
    assert not line.startswith("{")


def test_redact_text_keeps_ordinary_urls_and_text() -> None:
    text = "GET https://cdn.example.com:443/a/b.jpg?x=1 took 12ms (user@example.com)"
    assert redact_text(text) == text
    assert redact_text("a" * 200) == "a" * 200
    assert redact_text("a" * 201) == "<redacted 201 base64 chars>"
