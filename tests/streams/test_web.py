"""The worker's HTTP views, served over real HTTP by a real faust app's aiohttp server.

No broker is needed: `app.web.wsgi()` is the same set-up the faust worker does before
serving (`init_server`: faust's blueprints plus our pages) and returns the aiohttp
application, which aiohttp's `TestServer` serves on an ephemeral local port.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from streams.metrics import Metrics
from streams.web import READINESS_CHECKS, ReportSource, bearer_token_matches, register_views


@dataclass
class FakeHealth:
    """A `HealthSource` whose checks the test flips."""

    checks: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(READINESS_CHECKS, False))
    broken: bool = False

    def liveness(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("liveness details broke")
        return {"role": "inference", "uptime_s": 12.5}

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        if self.broken:
            raise RuntimeError("readiness broke")
        return all(self.checks.values()), dict(self.checks)


@dataclass
class FakeReports:
    """A `ReportSource` recording its calls and the thread that ran them."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    fail_with: Exception | None = None

    def list_reports(self) -> list[str]:
        return ["decisions_by_day", "dead_letters_by_code"]

    def run(self, name: str, since: str) -> dict[str, Any]:
        self.threads.append(threading.get_ident())
        self.calls.append((name, since))
        if self.fail_with is not None:
            raise self.fail_with
        if since == "bogus":
            raise ValueError("window must look like 30m, 12h or 7d, got 'bogus'")
        return {"report": name, "since": since, "rows": [{"day": "2025-11-20", "n": 3}]}


INFO = {"version": "0.1.0", "models": {"verification": "replay:recorded-outputs"}}

Client = TestClient[Any, Any]
Serve = Callable[[ReportSource | None], Awaitable[Client]]


def make_app(tmp_path: Path) -> faust.App:
    return faust.App(
        f"test-web-{tmp_path.name}",
        broker="kafka://127.0.0.1:1",  # never contacted: only the web server runs
        web_port=6066,
        datadir=str(tmp_path / "faust"),
        store="memory://",
    )


@pytest.fixture
def health() -> FakeHealth:
    return FakeHealth()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def serve(tmp_path: Path, health: FakeHealth, metrics: Metrics) -> AsyncIterator[Serve]:
    """`await serve(reports)` → an HTTP client of a faust app with the views registered."""
    clients: list[Client] = []

    async def start(reports: ReportSource | None) -> Client:
        app = make_app(tmp_path)
        paths = register_views(app, health, metrics, lambda: INFO, reports)
        assert "/healthz" in paths
        client: Client = TestClient(TestServer(await app.web.wsgi()))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def test_healthz_is_200_with_the_liveness_details(serve: Serve) -> None:
    client = await serve(None)
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "alive", "role": "inference", "uptime_s": 12.5}


async def test_healthz_stays_200_when_the_liveness_details_fail(
    serve: Serve, health: FakeHealth
) -> None:
    health.broken = True
    client = await serve(None)
    response = await client.get("/healthz")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "alive"
    assert "liveness details broke" in body["details_error"]


async def test_readyz_flips_from_503_with_failing_checks_to_200(
    serve: Serve, health: FakeHealth
) -> None:
    client = await serve(None)
    health.checks.update(broker_connected=True, models_loaded=True, sink_accepting_rows=True)

    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["ready"] is False
    assert body["failing"] == ["partitions_assigned", "sink_reachable"]
    assert body["reasons"] == ["no partitions assigned", "database unreachable"]
    assert body["checks"]["broker_connected"] is True

    health.checks.update(sink_reachable=True, sink_accepting_rows=False)
    body = await (await client.get("/readyz")).json()
    assert body["failing"] == ["partitions_assigned", "sink_accepting_rows"]
    assert body["reasons"] == ["no partitions assigned", "database rejecting rows"]

    health.checks.update(partitions_assigned=True, sink_accepting_rows=True)
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {
        "ready": True,
        "checks": dict.fromkeys(READINESS_CHECKS, True),
        "failing": [],
    }


async def test_readyz_is_503_when_the_readiness_call_raises(
    serve: Serve, health: FakeHealth
) -> None:
    health.broken = True
    client = await serve(None)
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["ready"] is False
    assert "readiness broke" in body["error"]


async def test_info_returns_the_info_callable_as_json(serve: Serve) -> None:
    client = await serve(None)
    response = await client.get("/info")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == INFO


async def test_metrics_serves_the_registry_and_reflects_readiness(
    serve: Serve, health: FakeHealth, metrics: Metrics
) -> None:
    client = await serve(None)
    metrics.count_in("pickup-completed", 4)

    async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        response = await client.get("/metrics")
        assert response.status == 200
        assert response.headers["Content-Type"] == metrics.render()[1]
        text = await response.text()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    samples = await scrape()
    key = ("visionstream_events_in_total", frozenset({("topic", "pickup-completed")}))
    assert samples[key] == 4
    assert samples[("visionstream_worker_ready", frozenset())] == 0

    health.checks = dict.fromkeys(READINESS_CHECKS, True)
    assert (await scrape())[("visionstream_worker_ready", frozenset())] == 1


async def test_metrics_negotiates_openmetrics(serve: Serve) -> None:
    client = await serve(None)
    response = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await response.text()).rstrip().endswith("# EOF")


async def test_report_runs_in_a_thread_with_the_default_window(serve: Serve) -> None:
    reports = FakeReports()
    client = await serve(reports)
    response = await client.get("/reports/decisions_by_day")
    assert response.status == 200
    assert await response.json() == {
        "report": "decisions_by_day",
        "since": "7d",
        "rows": [{"day": "2025-11-20", "n": 3}],
    }
    assert reports.calls == [("decisions_by_day", "7d")]
    assert reports.threads[0] != threading.get_ident()

    response = await client.get("/reports/dead_letters_by_code", params={"since": "12h"})
    assert response.status == 200
    assert reports.calls[-1] == ("dead_letters_by_code", "12h")


async def test_report_index_lists_the_reports(serve: Serve) -> None:
    client = await serve(FakeReports())
    response = await client.get("/reports")
    assert response.status == 200
    assert await response.json() == {"reports": ["decisions_by_day", "dead_letters_by_code"]}


async def test_unknown_report_is_404_and_names_the_known_ones(serve: Serve) -> None:
    reports = FakeReports()
    client = await serve(reports)
    response = await client.get("/reports/drop_table")
    assert response.status == 404
    body = await response.json()
    assert body["known"] == ["decisions_by_day", "dead_letters_by_code"]
    assert reports.calls == []


async def test_bad_window_is_400_and_backend_failure_is_503(serve: Serve) -> None:
    reports = FakeReports()
    client = await serve(reports)
    response = await client.get("/reports/decisions_by_day", params={"since": "bogus"})
    assert response.status == 400
    assert "30m, 12h or 7d" in (await response.json())["error"]

    reports.fail_with = ConnectionError("clickhouse://default:hunter2@db:8123 refused")
    response = await client.get("/reports/decisions_by_day")
    assert response.status == 503
    text = await response.text()
    assert "ConnectionError" in text
    assert "hunter2" not in text


async def test_reports_are_not_served_without_a_report_source(serve: Serve) -> None:
    client = await serve(None)
    assert (await client.get("/reports/decisions_by_day")).status == 404
    assert (await client.get("/reports")).status == 404


TOKEN = "s3cret-token-for-tests"


async def serve_with_token(tmp_path: Path, health: FakeHealth, metrics: Metrics) -> Client:
    app = make_app(tmp_path)
    register_views(app, health, metrics, lambda: INFO, FakeReports(), token=TOKEN)
    client: Client = TestClient(TestServer(await app.web.wsgi()))
    await client.start_server()
    return client


@pytest.mark.parametrize("path", ["/info", "/metrics", "/reports", "/reports/decisions_by_day"])
async def test_data_pages_need_the_bearer_token(
    tmp_path: Path, health: FakeHealth, metrics: Metrics, path: str
) -> None:
    client = await serve_with_token(tmp_path, health, metrics)
    try:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
        ):
            response = await client.get(path, headers=headers)
            assert response.status == 401, (path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN not in await response.text()
        response = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status == 200, path
    finally:
        await client.close()


async def test_probes_stay_open_when_a_token_is_set(
    tmp_path: Path, health: FakeHealth, metrics: Metrics
) -> None:
    health.checks = dict.fromkeys(READINESS_CHECKS, True)
    client = await serve_with_token(tmp_path, health, metrics)
    try:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 200
    finally:
        await client.close()


def test_bearer_token_matching() -> None:
    assert bearer_token_matches(f"Bearer {TOKEN}", TOKEN)
    assert bearer_token_matches(f"bearer  {TOKEN} ", TOKEN)
    assert not bearer_token_matches(None, TOKEN)
    assert not bearer_token_matches(TOKEN, TOKEN)
    assert not bearer_token_matches("Bearer ", TOKEN)
    assert not bearer_token_matches("Bearer x", "")  # no token configured matches nothing
