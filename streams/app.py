"""The Faust app: one factory, two roles.

- role `inference` (consumer group `<app_id>`): `pickup-completed` → `verification-decision`,
  `product-listed` → `category-tag`, model attempts → `verification-attempts`, failures →
  `dead-letter`.
- role `sink` (consumer group `<app_id>-sink`): every topic → ClickHouse.

Agents are thin: take a micro-batch bounded by size and time without auto-acks
(`noack_take`; faust's `take()` acknowledges a batch even when the agent raises),
hand it to a handler, wait until the broker acknowledged every output, then
acknowledge the inputs. A worker killed mid-batch therefore re-reads the batch.
With the slot engine (`VS_ENGINE_MODE=slot`) the pickup agent takes what has arrived
the same way but hands each input to `streams.streaming.StreamingVerifier`, which
publishes and acknowledges each one when its own answer is done, in offset order.

Each role registers the same way: its runtime (`streams.runtime`), one start task and
one shutdown hook for it (`_register_lifecycle`), and one `_register_agent` per input
topic, whose loop and consumers live in `streams.agents`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import faust

from streams import __version__
from streams.agents import (
    BatchConsumer,
    HandlerConsumer,
    SinkConsumer,
    StreamingConsumer,
    run_agent,
)
from streams.health import GracefulWorker, WorkerHealth
from streams.kafka_admin import bootstrap_servers, group_lag
from streams.logs import logging_config
from streams.metrics import Metrics
from streams.runtime import InferenceRuntime, SinkReports, SinkRuntime
from streams.settings import Settings
from streams.web import register_views

log = logging.getLogger(__name__)


class FaustPublisher:
    """`Publisher` over the app's producer; sends now (not attached to the current event)."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._topics: dict[str, faust.TopicT] = {}

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        """Hand the record to the producer; the returned future is the broker's answer."""
        channel = self._topics.get(topic)
        if channel is None:
            channel = self._topics[topic] = self._app.topic(
                topic, key_serializer="raw", value_serializer="raw"
            )
        delivery: Awaitable[Any] = await channel.send(key=key, value=value, force=True)
        return delivery


def create_app(settings: Settings, **runtime_overrides: Any) -> faust.App:
    """Build the app for `settings.role`; nothing connects or loads until the worker starts."""
    is_sink = settings.role == "sink"
    app_id = settings.sink_app_id if is_sink else settings.app_id
    datadir = settings.state_dir / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    worker_class = type(
        "Worker", (GracefulWorker,), {"shutdown_timeout_s": settings.shutdown_timeout_s}
    )
    app = faust.App(
        app_id,
        broker=settings.broker,
        key_serializer="raw",
        value_serializer="raw",
        web_port=settings.web_port,
        # faust binds `web_bind`; `web_host` only names the server in its URLs.
        web_bind=settings.web_host,
        web_host=settings.web_host,
        topic_replication_factor=1,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        # Static membership: a worker restarted after a crash takes its partitions back at
        # once instead of waiting for the dead member's session to expire.
        consumer_group_instance_id=settings.group_instance_id,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.session_timeout_s / 4,
        producer_acks=-1,
        producer_max_request_size=settings.max_message_bytes + 1024 * 1024,
        consumer_max_fetch_size=settings.max_message_bytes + 1024 * 1024,
        datadir=str(datadir),
        store="memory://",
        stream_wait_empty=True,
        # What a clean stop must still process: a bounded in-memory backlog.
        stream_buffer_maxsize=max(2 * settings.batch_size, 32),
        Worker=worker_class,
        logging_config=logging_config(settings.log_format),
    )
    publisher = FaustPublisher(app)
    metrics = Metrics()
    if is_sink:
        runtime: Any = _register_sink(app, settings, metrics, runtime_overrides)
    else:
        runtime = _register_inference(app, settings, publisher, metrics, runtime_overrides)
    _register_operations(app, settings, app_id, runtime, metrics)
    if is_sink:
        _register_review(app, settings, publisher)
    from streams.commands import register_commands

    register_commands(app, settings)
    return app


def _register_review(app: faust.App, settings: Settings, publisher: FaustPublisher) -> None:
    """The review copies' upkeep and, with reviewers configured, the review page (sink role)."""
    from processors.analytics.client import open_client
    from streams.review_web import register_review_upkeep, register_review_views

    opener = functools.partial(open_client, settings.effective_clickhouse_dsn)
    register_review_upkeep(app, settings, opener)
    if settings.review.page_enabled:
        register_review_views(app, settings, publisher, opener)


def _register_operations(
    app: faust.App, settings: Settings, app_id: str, runtime: Any, metrics: Metrics
) -> None:
    """Health, readiness, info, metrics and (sink role) report views, plus the lag probe."""
    health = WorkerHealth(
        app, runtime, role=settings.role, broker_timeout_s=3 * settings.lag_refresh_s + 5
    )
    topics = settings.topics
    consumed = (
        list(topics.all())
        if settings.role == "sink"
        else [topics.pickup_completed, topics.product_listed]
    )
    lag = functools.partial(group_lag, bootstrap_servers(settings.broker), app_id, consumed)

    def info() -> dict[str, Any]:
        return {
            "service": "visionstream",
            "version": __version__,
            "role": settings.role,
            "consumer_group": app_id,
            "models": dict(getattr(runtime, "model_versions", {})),
            "settings": settings.public(),
        }

    reports = SinkReports(settings.effective_clickhouse_dsn) if settings.role == "sink" else None
    register_views(app, health, metrics, info, reports, token=settings.web_token)

    async def refresh_consumer_lag() -> None:
        health.broker_answered(await metrics.refresh_lag(app_id, lag))

    _add_timer(app, settings.lag_refresh_s, refresh_consumer_lag)


class Runtime(Protocol):
    """What a role's runtime offers the app: one start and one stop."""

    async def start(self) -> None:
        """Open the role's resources (models, database); raise when it cannot."""

    async def stop(self) -> None:
        """Release them at shutdown."""


AsyncTask = Callable[[], Awaitable[None]]


def _add_task(app: faust.App, task: AsyncTask) -> None:
    """`app.task(task)`: faust's decorator is untyped (`no_type_check`), hence the cast."""
    register = cast(Callable[[AsyncTask], object], app.task)
    register(task)


def _add_timer(app: faust.App, interval: float, timer: AsyncTask) -> None:
    """`app.timer(interval)(timer)`; faust's decorator is untyped, hence the cast."""
    register = cast(Callable[..., Callable[[AsyncTask], object]], app.timer)
    register(interval=interval)(timer)


def _register_lifecycle(app: faust.App, runtime: Runtime, role: str) -> None:
    """Start `runtime` with the worker and stop it before shutdown.

    A start that raises stops the worker with the reason (logged critical).
    """

    async def start_runtime() -> None:
        try:
            await runtime.start()
        except Exception as exc:
            log.critical("%s start-up failed, stopping the worker: %s", role, exc, exc_info=exc)
            await app.crash(exc)

    def stop_runtime(sender: Any, /, *_: Any, signal: Any, **__: Any) -> Awaitable[None]:
        return runtime.stop()

    _add_task(app, start_runtime)
    app.on_before_shutdown.connect(stop_runtime)


def _register_agent(
    app: faust.App,
    channel: faust.TopicT,
    name: str,
    consumer: Callable[[], Awaitable[BatchConsumer]],
) -> None:
    """One agent named `name` on `channel`: `run_agent` with the role's consumer."""

    async def agent(stream: faust.StreamT[Any]) -> None:
        await run_agent(stream, consumer)

    agent.__name__ = agent.__qualname__ = name.replace("-", "_")
    app.agent(channel, name=name)(agent)


def _register_inference(
    app: faust.App,
    settings: Settings,
    publisher: FaustPublisher,
    metrics: Metrics,
    overrides: dict[str, Any],
) -> InferenceRuntime:
    """The inference role: its runtime, the pickup agent and the listing agent."""
    runtime = InferenceRuntime(settings, metrics, **overrides)
    app.conf.runtime = runtime  # the web views and tests reach it through the app
    _register_lifecycle(app, runtime, "inference")
    new_writer = functools.partial(runtime.new_writer, publisher)
    topics, partitions = settings.topics, settings.topic_partitions

    async def verification() -> BatchConsumer:
        await runtime.verification_ready.wait()
        if runtime.verification is None:
            raise RuntimeError("verification ready without a handler")
        streaming = runtime.streaming_verifier(new_writer)
        if streaming is not None:
            return StreamingConsumer(streaming, settings.batch_size)
        return HandlerConsumer(
            runtime.verification,
            new_writer,
            metrics,
            settings.batch_size,
            settings.batch_wait_s,
            after=runtime.sync_engine_metrics,
        )

    async def categorization() -> BatchConsumer:
        await runtime.ready.wait()
        if runtime.categorization is None:
            raise RuntimeError("categorization ready without a handler")
        return HandlerConsumer(
            runtime.categorization, new_writer, metrics, settings.batch_size, settings.batch_wait_s
        )

    pickups = app.topic(topics.pickup_completed, partitions=partitions)
    listings = app.topic(topics.product_listed, partitions=partitions)
    _register_agent(app, pickups, "verify-pickups", verification)
    _register_agent(app, listings, "categorize-listings", categorization)
    return runtime


def _register_sink(
    app: faust.App, settings: Settings, metrics: Metrics, overrides: dict[str, Any]
) -> SinkRuntime:
    """The sink role: its runtime and the one agent on every topic."""
    runtime = SinkRuntime(settings, metrics, **overrides)
    app.conf.runtime = runtime
    _register_lifecycle(app, runtime, "sink")

    async def sink() -> BatchConsumer:
        await runtime.ready.wait()
        return SinkConsumer(runtime, metrics, settings.sink_max_rows, settings.sink_max_interval_s)

    _register_agent(app, app.topic(*settings.topics.all()), "analytics-sink", sink)
    return runtime
