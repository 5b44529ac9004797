"""HTTP endpoints of a worker, served by faust's own web server (aiohttp driver).

`register_views` adds these routes to a faust app with `app.page(...)`; faust's
worker serves them on `web_port` once it starts, on the worker's event loop
(`web_in_thread` is off):

- `GET /healthz` – liveness: 200 with `HealthSource.liveness()` while the process
  runs (also when that call fails: the failure is logged and reported in the body).
- `GET /readyz` – readiness: 200 when `HealthSource.readiness()` says ready, else 503
  naming the failing checks; 503 too when the readiness call itself raises.
- `GET /info` – `info()` as JSON (version, model versions, redacted settings); 500 if
  it raises.
- `GET /metrics` – the worker's Prometheus registry (OpenMetrics on request); sets
  `worker_ready` from `readiness()` first, so the gauge is never stale.
- `GET /reports` and `GET /reports/{name}?since=7d` – only when a `ReportSource` is
  given: the list of reports, or one report as JSON (404 unknown name, 400 bad
  `since`, 503 when the report backend fails). Reports run in a thread.

Authentication: when a token is given (`VS_WEB_TOKEN`, required by the settings as
soon as `VS_WEB_HOST` is not a loopback address), `/info`, `/metrics` and `/reports`
answer 401 unless the request carries `Authorization: Bearer <token>`; liveness and
readiness stay open for probes. `authorization_error()` is the one check, for any
view that shows data. The token is compared in constant time and never logged.

Views must be registered before the worker starts: aiohttp freezes its router when
the server starts. `HealthSource` methods run on the event loop, so they must return
cached state and never do I/O.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol

import faust
from faust.web import Request, Response, View

from streams.metrics import Metrics

log = logging.getLogger(__name__)

#: The readiness checks the `HealthSource` of a worker reports, by name.
READINESS_CHECKS: Final = (
    "broker_connected",
    "partitions_assigned",
    "models_loaded",
    "sink_reachable",
    "sink_accepting_rows",
)
#: What a failing check means, for people reading `/readyz`.
CHECK_REASONS: Final = {
    "broker_connected": "broker not answering",
    "partitions_assigned": "no partitions assigned",
    "models_loaded": "models not loaded",
    "sink_reachable": "database unreachable",
    "sink_accepting_rows": "database rejecting rows",
}
DEFAULT_REPORT_WINDOW: Final = "7d"


class HealthSource(Protocol):
    """What the health views ask; both methods are cheap reads of cached state."""

    def liveness(self) -> dict[str, Any]:
        """Facts about the running process (uptime, role, ...), JSON-serialisable."""
        ...

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """Whether the worker can do its work now, and each check's result."""
        ...


class ReportSource(Protocol):
    """Named analytics reports; both methods may block (they run in a thread)."""

    def list_reports(self) -> list[str]:
        """Names of the reports `run` accepts."""
        ...

    def run(self, name: str, since: str) -> dict[str, Any]:
        """Run a report over the window `since` ("30m", "12h", "7d").

        Raises `ValueError` for a malformed window; other exceptions mean the
        report backend failed.
        """
        ...


def bearer_token_matches(authorization: str | None, token: str) -> bool:
    """Whether an `Authorization` header value is `Bearer <token>` (constant-time compare)."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def authorization_error(view: View, request: Request, token: str | None) -> Response | None:
    """None when `request` may see the data; otherwise the 401 response to return.

    With no token configured every request passes (the settings only allow that on a
    loopback address). Use it first in every view that shows data:
    `if (denied := authorization_error(self, request, token)) is not None: return denied`.
    """
    if not token or bearer_token_matches(request.headers.get("Authorization"), token):
        return None
    return view.error(
        401,
        "this page needs Authorization: Bearer <VS_WEB_TOKEN>",
        headers={"WWW-Authenticate": 'Bearer realm="visionstream"'},
    )


def register_views(
    app: faust.App,
    health: HealthSource,
    metrics: Metrics,
    info: Callable[[], dict[str, Any]],
    reports: ReportSource | None = None,
    *,
    token: str | None = None,
) -> list[str]:
    """Add the worker's routes to `app` and return their paths.

    `token`: the bearer token `/info`, `/metrics` and `/reports` require (None: open).
    Call it once per app, before the worker starts. Raises whatever aiohttp raises
    for a path that is already registered.
    """
    routes = [*_health_views(health), *_data_views(health, metrics, info, token)]
    if reports is not None:
        routes += _report_views(reports, token)
    for path, view in routes:
        app.page(path, name=f"visionstream:{view.__name__.lower()}")(view)
    return [path for path, _ in routes]


def _health_views(health: HealthSource) -> list[tuple[str, type[View]]]:
    """The open probes: `/healthz` and `/readyz`."""

    class Liveness(View):
        """200 while the process runs."""

        async def get(self, request: Request, **kwargs: Any) -> Response:
            try:
                details = health.liveness()
            except Exception as exc:
                log.exception("liveness details failed")
                details = {"details_error": f"{type(exc).__name__}: {exc}"}
            return self.json({"status": "alive", **details})

    class Readiness(View):
        """200 when ready, 503 with the failing checks otherwise."""

        async def get(self, request: Request, **kwargs: Any) -> Response:
            ready, checks, error = _readiness(health)
            failing = sorted(name for name, passed in checks.items() if not passed)
            body: dict[str, Any] = {"ready": ready, "checks": checks, "failing": failing}
            if failing:
                body["reasons"] = [CHECK_REASONS.get(name, name) for name in failing]
            if error is not None:
                body["error"] = error
            return self.json(body, status=200 if ready else 503)

    return [("/healthz", Liveness), ("/readyz", Readiness)]


def _data_views(
    health: HealthSource, metrics: Metrics, info: Callable[[], dict[str, Any]], token: str | None
) -> list[tuple[str, type[View]]]:
    """The views behind the bearer token: `/info` and `/metrics`."""

    class Info(View):
        """Version, model versions and settings without secrets."""

        async def get(self, request: Request, **kwargs: Any) -> Response:
            if (denied := authorization_error(self, request, token)) is not None:
                return denied
            try:
                return self.json(info())
            except Exception as exc:
                log.exception("info page failed")
                return self.error(500, f"info unavailable: {type(exc).__name__}")

    class PrometheusMetrics(View):
        """The worker's metrics in Prometheus (or OpenMetrics) exposition format."""

        async def get(self, request: Request, **kwargs: Any) -> Response:
            if (denied := authorization_error(self, request, token)) is not None:
                return denied
            ready, _, _ = _readiness(health)
            metrics.set_ready(ready)
            body, content_type = metrics.render(request.headers.get("Accept"))
            # aiohttp refuses a charset inside `content_type=`, so send it as a header.
            return self.bytes(body, headers={"Content-Type": content_type})

    return [("/info", Info), ("/metrics", PrometheusMetrics)]


def _report_views(reports: ReportSource, token: str | None) -> list[tuple[str, type[View]]]:
    class ReportIndex(View):
        """The names of the available reports."""

        async def get(self, request: Request, **kwargs: Any) -> Response:
            if (denied := authorization_error(self, request, token)) is not None:
                return denied
            names = await asyncio.to_thread(reports.list_reports)
            return self.json({"reports": names})

    class Report(View):
        """One report as JSON over the window `?since=` (default 7d)."""

        async def get(self, request: Request, **kwargs: Any) -> Response:
            if (denied := authorization_error(self, request, token)) is not None:
                return denied
            name = str(request.match_info["name"])
            since = request.query.get("since") or DEFAULT_REPORT_WINDOW
            known = await asyncio.to_thread(reports.list_reports)
            if name not in known:
                return self.error(404, f"unknown report {name!r}", known=known)
            try:
                result = await asyncio.to_thread(reports.run, name, since)
            except ValueError as exc:
                return self.error(400, str(exc))
            except Exception as exc:
                log.exception("report %s failed", name)
                return self.error(503, f"report backend failed: {type(exc).__name__}")
            return self.json(result)

    return [("/reports", ReportIndex), ("/reports/{name}", Report)]


def _readiness(health: HealthSource) -> tuple[bool, dict[str, bool], str | None]:
    """`readiness()`, with a raising call read as not ready (and its error)."""
    try:
        ready, checks = health.readiness()
    except Exception as exc:
        log.exception("readiness check failed")
        return False, {}, f"{type(exc).__name__}: {exc}"
    return bool(ready), dict(checks), None
