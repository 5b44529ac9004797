"""Start-up of a worker's resources: codecs, image gatherer, engines, categorizer, sink.

`InferenceRuntime.start()` is the one explicit step that loads models (off the event
loop); the verification agent waits for `verification_ready` (set once the engine is
loaded, before the categorizer), the categorization agent for `ready`. A model that cannot
load stops the worker at start with the reason, never per event.

By default (`VS_ENGINE_MODE=auto`, or `slot`) a native InternVL engine is wrapped in the
slot engine (`processors.slot_engine.SlotEngine`, continuous batching) and the pickup agent
runs on a `streams.streaming.StreamingVerifier`; the replay and remote-code engines, and
every engine with `VS_ENGINE_MODE=static`, stay on static micro-batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from processors.errors import ErrorCode, ProcessingError
from processors.gathering import ImageGatherer
from processors.inference import InferenceEngine, ReplayEngine
from processors.review.images import ReviewCopier
from processors.verification import SubmittingEngine, VerificationPipeline
from streams.codecs import Codecs, now_ms
from streams.handlers import CategorizationHandler, RawMessage, VerificationHandler
from streams.metrics import Metrics
from streams.publishing import EventWriter, Publisher
from streams.settings import Settings
from streams.streaming import StreamingVerifier

if TYPE_CHECKING:
    from processors.categorization.service import BatchCategorizer
    from processors.internvl import EngineConfig

log = logging.getLogger(__name__)
R = TypeVar("R")


def load_replay_outputs(path: Path) -> dict[str, list[str]]:
    """Read `{"uuid": ..., "model_outputs": [...]}` lines into the replay engine's table."""
    table: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                table[str(row["uuid"])] = [str(text) for text in row["model_outputs"]]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a recorded-output line: {exc}") from exc
    return table


def engine_config(settings: Settings, model_path: Path) -> EngineConfig:
    """The InternVL engine's configuration from the worker's settings."""
    from processors.internvl import EngineConfig

    return EngineConfig(
        model_path=model_path,
        max_new_tokens=settings.max_new_tokens,
        max_batch_size=settings.model_max_batch,
        compile_vision=settings.model_compile,
        compile_prefill=settings.model_compile,
        compile_decode=settings.model_compile,
        fuse_projections=settings.model_fuse_projections,
        constrained_decoding=settings.constrained_decoding,
    )


NO_ENGINE_MESSAGE = (
    "no verification engine chosen: set VS_MODEL_PATH to a local InternVL checkpoint, or "
    "VS_ENGINE=replay to replay recorded model outputs (VS_REPLAY_OUTPUTS)"
)


def slot_engine(settings: Settings, engine: InferenceEngine) -> InferenceEngine:
    """`engine` wrapped in the slot engine when `VS_ENGINE_MODE` asks for it (unloaded).

    `auto` (the default) and `slot` wrap the native InternVL engine; `static` never wraps.
    An engine that already takes submissions is kept; only the native InternVL engine can
    be wrapped, so the replay and remote-code engines stay static (a warning when `slot`
    was asked for explicitly).
    """
    if settings.engine_mode == "static" or isinstance(engine, SubmittingEngine):
        return engine
    from processors.internvl import NativeInternVLEngine

    if not isinstance(engine, NativeInternVLEngine):
        if settings.engine_mode == "slot":
            log.warning(
                "VS_ENGINE_MODE=slot needs the native InternVL engine; %s runs static batches",
                type(engine).__name__,
            )
        return engine
    from processors.slot_engine import SlotEngine, SlotEngineConfig

    return SlotEngine(
        engine,
        SlotEngineConfig(
            slots=settings.slot_count,
            context_length=settings.slot_context_length,
            prefill_tokens_per_step=settings.slot_prefill_tokens,
            queue_size=settings.slot_queue_size,
            staged_requests=settings.slot_staged_requests,
            forced_tokens=settings.slot_forced_tokens,
            follow_model=settings.slot_follow_model,
            mixed_chunk_tokens=settings.slot_mixed_chunk,
        ),
    )


def build_engine(settings: Settings) -> InferenceEngine:
    """The engine the settings ask for; the replay engine only when asked for by name.

    `VS_ENGINE=replay` gives the replay engine; `VS_MODEL_PATH` (with `VS_ENGINE` unset or
    `internvl`) the real model. Neither raises `ProcessingError(MODEL_NOT_LOADED)` naming
    the settings, so a production worker with a forgotten model path refuses to start
    instead of dead-lettering every pickup.
    """
    if settings.engine == "replay":
        if settings.replay_outputs is None or not settings.replay_outputs.is_file():
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                f"VS_ENGINE=replay needs VS_REPLAY_OUTPUTS, a file of recorded outputs "
                f"(missing: {settings.replay_outputs})",
                "startup",
            )
        return ReplayEngine(
            load_replay_outputs(settings.replay_outputs),
            version="replay:recorded-outputs",
            latency_s=settings.replay_latency_s,
        )
    if settings.model_path is None:
        raise ProcessingError(ErrorCode.MODEL_NOT_LOADED, NO_ENGINE_MESSAGE, "startup")
    from processors.internvl import load_engine

    return load_engine(engine_config(settings, settings.model_path))


class InferenceRuntime:
    """Everything the inference role needs, loaded once in `start()`."""

    def __init__(
        self, settings: Settings, metrics: Metrics, *, engine: InferenceEngine | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.codecs = Codecs(settings.schema_registry_url)
        self.gatherer = ImageGatherer(settings.gather)
        self._engine = engine
        self.verification: VerificationHandler | None = None
        self.categorization: CategorizationHandler | None = None
        self.model_versions: dict[str, str] = {}
        self.ready = asyncio.Event()
        # Set as soon as verification can run: a restarted worker decides pickups while
        # the categorizer is still loading.
        self.verification_ready = asyncio.Event()
        self.failed: BaseException | None = None
        self._cache_seen = (0, 0)
        self.streaming: StreamingVerifier | None = None

    async def start(self) -> None:
        """Load the engine, then the categorizer; `failed` keeps what stopped it.

        Raises what loading raises (`ProcessingError(MODEL_NOT_LOADED)` for a missing
        model or artifacts); the app then stops the worker with the reason.
        """
        try:
            await self._start()
        except BaseException as exc:
            self.failed = exc
            raise
        self.ready.set()

    async def _start(self) -> None:
        settings = self.settings
        await self.gatherer.start()
        engine = slot_engine(settings, self._engine or build_engine(settings))
        self._engine = engine
        await in_daemon_thread(engine.load, "load-engine")
        self.model_versions["verification"] = engine.model_version
        if isinstance(engine, ReplayEngine):
            # It never looks at pixels: no images fetched, and torch is never imported.
            pipeline = VerificationPipeline(
                engine, images=None, tiling=None, on_phase=self.metrics.observe_phase
            )
        else:
            from processors.tiling import TilingConfig

            pipeline = VerificationPipeline(
                engine,
                images=self.gatherer,
                tiling=TilingConfig(),
                on_phase=self.metrics.observe_phase,
            )
        review = settings.review
        self.verification = VerificationHandler(
            pipeline,
            self.codecs,
            settings.topics,
            settings.max_message_bytes,
            self.metrics,
            copier=ReviewCopier(review.copy_limits, settings.gather) if review.copies else None,
        )
        self.verification_ready.set()
        categorizer = await in_daemon_thread(self._load_categorizer, "load-categorizer")
        self.model_versions["categorization"] = categorizer.model_version
        from processors.categorization.service import CategorizationService

        service = CategorizationService(
            categorizer, self.gatherer, on_phase=self.metrics.observe_phase
        )
        self.categorization = CategorizationHandler(
            service,
            self.codecs,
            settings.topics,
            settings.max_message_bytes,
            self.metrics,
        )
        log.info("models loaded: %s", self.model_versions)

    def _load_categorizer(self) -> BatchCategorizer:
        from streams.training import load_categorizer

        settings = self.settings
        if settings.categorizer_artifacts is None or not settings.categorizer_artifacts.is_dir():
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                f"no categorizer artifacts at {settings.categorizer_artifacts}: train them with "
                "`python -m streams train-categorizer` or set VS_CATEGORIZER_ARTIFACTS",
                "startup",
            )
        categorizer: BatchCategorizer = load_categorizer(settings)  # a `Categorizer`
        return categorizer

    def sync_engine_metrics(self) -> None:
        """Forward the engine's vendor-image feature-cache counters to the metrics."""
        engine = getattr(self._engine, "engine", self._engine)  # the slot engine wraps one
        cache = getattr(engine, "feature_cache", None)
        if cache is None:
            return
        hits, misses = int(cache.hits), int(cache.misses)
        seen_hits, seen_misses = self._cache_seen
        if hits < seen_hits or misses < seen_misses:  # the cache was cleared
            seen_hits = seen_misses = 0
        self.metrics.count_cache_hit(hits - seen_hits)
        self.metrics.count_cache_miss(misses - seen_misses)
        self._cache_seen = (hits, misses)

    def new_writer(self, publisher: Publisher) -> EventWriter:
        """A fresh writer for one batch (or one slot-mode input) over `publisher`."""
        return EventWriter(publisher, self.codecs, self.settings.topics)

    def streaming_verifier(self, new_writer: Callable[[], EventWriter]) -> StreamingVerifier | None:
        """The slot-mode pickup agent's verifier, or None when verification runs static.

        At most the engine's slots plus its queue are in flight (gathering, decoding or
        publishing).
        """
        engine = self._engine
        if self.verification is None or not isinstance(engine, SubmittingEngine):
            return None
        slots = int(getattr(getattr(engine, "scheduler", None), "slots", 0) or 0)
        self.streaming = StreamingVerifier(
            self.verification,
            new_writer,
            self.metrics,
            has_room=engine.has_room,
            max_in_flight=slots + self.settings.slot_queue_size,
            on_done=self.sync_engine_metrics,
        )
        return self.streaming

    async def stop(self) -> None:
        """Drain the slot-mode inputs in flight (half the shutdown budget), then close."""
        if self.streaming is not None:
            await self.streaming.drain(self.settings.shutdown_timeout_s / 2)
        await self.gatherer.close()
        close = getattr(self._engine, "close", None)
        if self.streaming is not None and callable(close):
            await asyncio.to_thread(close)


async def in_daemon_thread(call: Callable[[], R], name: str) -> R:
    """Await `call` run on a daemon thread of its own; raises what `call` raises.

    For model loads, which can take minutes: a worker told to stop while one runs exits
    without waiting for it (a pool thread of `asyncio.to_thread` would be joined at
    interpreter exit, holding the process until its shutdown timeout kills it).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[R] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        outcome: Callable[[], None]
        try:
            outcome = functools.partial(future.set_result, call())
        except BaseException as exc:  # noqa: BLE001 (handed to the awaiting task)
            outcome = functools.partial(future.set_exception, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future


async def _retry_while(
    error: type[BaseException],
    call: Callable[[], R],
    what: str,
    mark: Callable[[bool], None] | None = None,
) -> R:
    """Run `call` off the loop until it stops raising `error`, backing off up to 30 s.

    `mark(ok)` is told the outcome of each try (readiness follows it).
    """
    delay = 0.5
    while True:
        try:
            result = await asyncio.to_thread(call)
        except error as exc:
            if mark is not None:
                mark(False)
            log.warning("%s (%s); retrying in %.1fs, nothing acknowledged", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        else:
            if mark is not None:
                mark(True)
            return result


def build_sink(settings: Settings, **options: Any) -> Any:
    """The analytics sink the settings describe (not set up yet); `options` go to it."""
    from processors.analytics.sink import AnalyticsSink

    return AnalyticsSink(
        settings.effective_clickhouse_dsn,
        topics=settings.topics,
        max_rows=settings.sink_max_rows,
        max_interval_s=settings.sink_max_interval_s,
        **options,
    )


class SinkRuntime:
    """The analytics sink's resources: codecs and the ClickHouse sink.

    `store()` decodes a batch, adds it to the sink and flushes; while ClickHouse is
    unavailable it retries with capped backoff and does not return, so the agent
    acknowledges nothing, the consumer lag grows and nothing is dropped.
    """

    def __init__(self, settings: Settings, metrics: Metrics, *, sink: Any | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.codecs = Codecs(settings.schema_registry_url)
        self._sink = sink
        self._reachable = False
        self._accepting = True
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self.undecodable = 0

    @property
    def sink(self) -> Any:
        """The started sink; `RuntimeError` before `start()` built it."""
        if self._sink is None:
            raise RuntimeError("sink not started")
        return self._sink

    async def start(self) -> None:
        """Open ClickHouse and apply migrations; while it is unreachable, wait and retry."""
        from processors.analytics.client import SinkUnavailable

        try:
            if self._sink is None:
                self._sink = build_sink(self.settings)
            await _retry_while(
                SinkUnavailable, self._sink.setup, "ClickHouse unavailable at start", self._mark
            )
        except BaseException as exc:
            self.failed = exc
            raise
        log.info("analytics sink ready: %s", self._sink.dsn)
        self.ready.set()

    async def store(self, messages: Sequence[RawMessage]) -> None:
        """Decode `messages` into the sink and flush; returns once ClickHouse has them.

        An undecodable message is counted in `undecodable` and skipped (the inference
        worker dead-letters it); while ClickHouse is unavailable this retries and does
        not return.
        """
        from processors.analytics.client import SinkUnavailable
        from processors.analytics.rows import SinkRecord

        for message in messages:
            try:
                schema = self.settings.topics.schema_of(message.topic)
                value = self.codecs.for_schema(schema).decode(
                    message.value, max_bytes=self.settings.max_message_bytes
                )
            except (ProcessingError, KeyError) as exc:
                # Bad input on an input topic: the inference worker dead-letters it; skip here.
                self.undecodable += 1
                log.info(
                    "sink skips undecodable %s@%d:%d: %s",
                    message.topic,
                    message.partition,
                    message.offset,
                    exc,
                )
                continue
            # The Kafka timestamp, as the schema promises (kafka_time, version, the
            # event_time fallback): a re-read copy gets the same values and partition.
            timestamp = message.timestamp_ms if message.timestamp_ms is not None else now_ms()
            self.sink.add(
                SinkRecord(message.topic, message.partition, message.offset, value, timestamp)
            )
        with self.metrics.time_phase("sink"):
            result = await _retry_while(
                SinkUnavailable, self.sink.flush, "ClickHouse unavailable", self._mark
            )
        if result.inserts or result.failed_rows:
            self._accepting = result.failed_rows == 0
        self.metrics.count_sink_failed_rows(result.failed_rows)

    def _mark(self, reachable: bool) -> None:
        self._reachable = reachable

    def sink_reachable(self) -> bool:
        """Whether the last ClickHouse call (setup or flush) succeeded."""
        return self._reachable

    def sink_accepting_rows(self) -> bool:
        """False while the latest flush that wrote rows had rows ClickHouse rejected alone.

        Those rows are in `sink_failures` and their inputs acknowledged; readiness says
        "database rejecting rows" until a flush stores everything it was given.
        """
        return self._accepting

    async def stop(self) -> None:
        """Close the sink (off the event loop)."""
        if self._sink is not None:
            await asyncio.to_thread(self._sink.close)


class SinkReports:
    """`ReportSource` for the sink's web server: the process that owns the database."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._client: Any = None

    def list_reports(self) -> list[str]:
        """The names of the reports `run` knows."""
        from processors.analytics.reports import list_reports

        return list(list_reports())

    def run(self, name: str, since: str) -> dict[str, Any]:
        """Run report `name` over the rows since `since` (opens the client on first use)."""
        from processors.analytics.client import open_client
        from processors.analytics.reports import parse_since, run_report, to_json

        if self._client is None:
            self._client = open_client(self._dsn)
        result = run_report(self._client, name, parse_since(since))
        loaded: dict[str, Any] = json.loads(to_json(result))
        return {"report": name, "since": since, **loaded}
