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
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, cast

import faust
from faust.streams import Stream

from streams import __version__
from streams.handlers import BatchHandler, RawMessage
from streams.health import GracefulWorker, WorkerHealth
from streams.kafka_admin import bootstrap_servers, group_lag
from streams.logs import logging_config
from streams.metrics import Metrics
from streams.publishing import EventWriter
from streams.runtime import InferenceRuntime, SinkReports, SinkRuntime
from streams.settings import Settings
from streams.web import register_views

log = logging.getLogger(__name__)


class FaustPublisher:
    """`Publisher` over the app's producer; sends now (not attached to the current event)."""

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._topics: dict[str, Any] = {}

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        channel = self._topics.get(topic)
        if channel is None:
            channel = self._topics[topic] = self._app.topic(
                topic, key_serializer="raw", value_serializer="raw"
            )
        delivery: Awaitable[Any] = await channel.send(key=key, value=value, force=True)
        return delivery


def micro_batches(stream: faust.StreamT, size: int, within: float) -> AsyncIterator[Sequence[Any]]:
    """Batches of up to `size` events, at most `within` seconds apart, never auto-acked.

    faust's `StreamT` interface does not declare `noack_take`; its `Stream` class has it.
    """
    return cast(Stream[Any], stream).noack_take(size, within=within)


def to_raw(events: Sequence[Any]) -> list[RawMessage]:
    return [
        RawMessage(
            topic=event.message.topic,
            partition=event.message.partition,
            offset=event.message.offset,
            key=event.message.key,
            value=event.message.value,
            timestamp_ms=kafka_timestamp_ms(event.message.timestamp),
        )
        for event in events
    ]


def kafka_timestamp_ms(seconds: float | None) -> int | None:
    """faust's message timestamp (seconds, float) as Kafka's ms; None when absent (<= 0)."""
    if seconds is None or seconds <= 0:
        return None
    return round(seconds * 1000)


BATCH_RETRY_MAX_S = 30.0
# Slot mode: how long the agent waits for more arrivals before handing on what it has.
SLOT_TAKE_WAIT_S = 0.02


async def process_batch(
    handler: BatchHandler,
    events: Sequence[Any],
    new_writer: Callable[[], EventWriter],
    metrics: Metrics,
    *,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Handle one micro-batch; acknowledge its inputs only after every output is stored.

    Per-event failures are dead letters and publishing failures are retried or replaced
    inside the writer. If the handler still raises, the whole batch runs again with a
    new writer after a capped backoff, and nothing is acknowledged meanwhile: the agent
    never crashes, because faust restarts a crashed agent past its unacknowledged batch.
    Outputs sent by a failed run may repeat, with the same idempotency keys.
    """
    messages = to_raw(events)
    agent = getattr(handler, "agent", type(handler).__name__)
    metrics.observe_batch(agent, len(messages))
    for message in messages:
        metrics.count_in(message.topic)
    delay = 0.5
    while True:
        writer = new_writer()
        try:
            await handler.handle(messages, writer)
            with metrics.time_phase("publish"):
                await writer.flush()
            break
        except Exception:
            log.exception(
                "%s: a batch of %d raised; running it again in %.1fs, nothing acknowledged",
                agent,
                len(messages),
                delay,
            )
            await sleep(delay)
            delay = min(delay * 2, BATCH_RETRY_MAX_S)
    for topic, sent in writer.sent.items():
        metrics.count_out(topic, sent)
    for event in events:
        event.ack()


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

    @app.timer(interval=settings.lag_refresh_s)
    async def refresh_consumer_lag() -> None:
        health.broker_answered(await metrics.refresh_lag(app_id, lag))


def _register_inference(
    app: faust.App,
    settings: Settings,
    publisher: FaustPublisher,
    metrics: Metrics,
    overrides: dict[str, Any],
) -> InferenceRuntime:
    runtime = InferenceRuntime(settings, metrics, **overrides)
    app.conf.runtime = runtime  # the web views and tests reach it through the app
    topics = settings.topics
    pickups = app.topic(topics.pickup_completed, partitions=settings.topic_partitions)
    listings = app.topic(topics.product_listed, partitions=settings.topic_partitions)

    @app.task
    async def load_models() -> None:
        try:
            await runtime.start()
        except Exception as exc:
            log.critical("start-up failed, stopping the worker: %s", exc)
            await app.crash(exc)

    @app.on_before_shutdown.connect
    def close_runtime(sender: Any, /, *_: Any, signal: Any, **__: Any) -> Awaitable[None]:
        return runtime.stop()

    @app.agent(pickups, name="verify-pickups")
    async def verify_pickups(stream: faust.StreamT) -> None:
        await runtime.verification_ready.wait()
        assert runtime.verification is not None
        streaming = runtime.streaming_verifier(functools.partial(runtime.new_writer, publisher))
        if streaming is not None:
            async for events in micro_batches(stream, settings.batch_size, SLOT_TAKE_WAIT_S):
                await streaming.dispatch(events, to_raw(events))
            return
        async for events in micro_batches(stream, settings.batch_size, settings.batch_wait_s):
            writer = functools.partial(runtime.new_writer, publisher)
            await process_batch(runtime.verification, events, writer, metrics)
            runtime.sync_engine_metrics()

    @app.agent(listings, name="categorize-listings")
    async def categorize_listings(stream: faust.StreamT) -> None:
        await runtime.ready.wait()
        assert runtime.categorization is not None
        async for events in micro_batches(stream, settings.batch_size, settings.batch_wait_s):
            writer = functools.partial(runtime.new_writer, publisher)
            await process_batch(runtime.categorization, events, writer, metrics)

    return runtime


def _register_sink(
    app: faust.App, settings: Settings, metrics: Metrics, overrides: dict[str, Any]
) -> SinkRuntime:
    runtime = SinkRuntime(settings, metrics, **overrides)
    app.conf.runtime = runtime
    everything = app.topic(*settings.topics.all())

    @app.task
    async def open_sink() -> None:
        try:
            await runtime.start()
        except Exception as exc:
            log.critical("sink start-up failed, stopping: %s", exc)
            await app.crash(exc)

    @app.on_before_shutdown.connect
    def close_sink(sender: Any, /, *_: Any, signal: Any, **__: Any) -> Awaitable[None]:
        return runtime.stop()

    @app.agent(everything, name="analytics-sink")
    async def analytics_sink(stream: faust.StreamT) -> None:
        await runtime.ready.wait()
        async for events in micro_batches(
            stream, settings.sink_max_rows, settings.sink_max_interval_s
        ):
            messages = to_raw(events)
            metrics.observe_batch("analytics-sink", len(messages))
            for message in messages:
                metrics.count_in(message.topic)
            await runtime.store(messages)
            for event in events:
                event.ack()

    return runtime
