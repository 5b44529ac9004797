"""Prometheus metrics of one worker, in a registry the worker owns.

`Metrics` is created once at start-up and passed to whoever records (handlers,
agents) and to the `/metrics` view (`streams.web`). It never touches
`prometheus_client.REGISTRY`, so two workers in one process (or two tests) never
share a counter. Every metric name carries the `visionstream_` prefix.

Label values are bounded by construction: topics are the configured topic names,
codes and stages come from `processors.errors`, phases from `PHASES`, and
`time_phase` / `observe_phase` refuse any other phase with `ValueError` (a
programming error, found by the first test that reaches it).

`batch_size` and `phase_seconds` get one observation per micro-batch: the agents
(`streams.agents`) observe the batch size and the publish phase, the processors their own
phases through a `processors.batching.PhaseObserver` (`observe_phase`): gather, tile,
model and decide (`VerificationPipeline`), categorize (`CategorizationService`), and sink
(`SinkRuntime.store`). In slot mode each input is its own batch.

Two families are collected at scrape time instead of being pushed:

- `visionstream_gpu_memory_bytes{device,kind}`: read from `torch.cuda` only when the
  worker has already imported torch and initialised CUDA; this module never imports
  torch and never initialises a device.
- `visionstream_consumer_lag{group,topic,partition}`: the last snapshot stored by
  `Metrics.refresh_lag`, which runs the (blocking) lag function in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from processors.errors import ErrorCode

log = logging.getLogger(__name__)

NAMESPACE: Final = "visionstream"

#: The phases `phase_seconds` accepts, in pipeline order.
PHASES: Final = ("gather", "tile", "model", "decide", "categorize", "sink", "publish")

#: Pipeline micro-batches: up to a few hundred events (the sink takes up to 500 rows).
BATCH_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: From a cache hit (milliseconds) to a long generation on a large batch (minutes).
PHASE_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

#: Reads committed-offset lag per `(topic, partition)`; blocking, called in a thread.
LagFunction = Callable[[], Mapping[tuple[str, int], int]]


class GpuMemoryCollector(Collector):
    """`gpu_memory_bytes{device,kind}` from torch's caching allocator, per CUDA device.

    Yields nothing unless torch is already in `modules` (default `sys.modules`) and
    `torch.cuda.is_initialized()` is true: a worker that never touched CUDA has no
    GPU memory to report, and reading the allocator must not create a CUDA context.
    Any error while reading is logged at debug level and yields nothing, so a scrape
    never fails because of the GPU.
    """

    def __init__(self, modules: Mapping[str, ModuleType] | None = None) -> None:
        self._modules = sys.modules if modules is None else modules

    def describe(self) -> Iterable[Metric]:
        """Reserve the name in the registry without reading the GPU."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """One sample per device and kind (`allocated`, `reserved`), or nothing."""
        torch = self._modules.get("torch")
        if torch is None:
            return []
        try:
            cuda = torch.cuda
            if not cuda.is_initialized():
                return []
            family = self._family()
            for index in range(cuda.device_count()):
                device = f"cuda:{index}"
                family.add_metric([device, "allocated"], float(cuda.memory_allocated(index)))
                family.add_metric([device, "reserved"], float(cuda.memory_reserved(index)))
        except Exception as exc:
            log.debug("GPU memory not readable: %s", exc, exc_info=True)
            return []
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{NAMESPACE}_gpu_memory_bytes",
            "GPU memory held by torch's caching allocator, by device and kind.",
            labels=["device", "kind"],
        )


class ConsumerLagCollector(Collector):
    """`consumer_lag{group,topic,partition}` from the last stored snapshot per group.

    `replace(group, lag)` swaps a group's whole snapshot, so partitions that are no
    longer reported disappear; `clear(group)` drops it (lag unknown).
    """

    def __init__(self) -> None:
        self._snapshots: dict[str, dict[tuple[str, int], int]] = {}

    def replace(self, group: str, lag: Mapping[tuple[str, int], int]) -> None:
        """Store `lag` as the group's current snapshot."""
        self._snapshots = {**self._snapshots, group: dict(lag)}

    def clear(self, group: str) -> None:
        """Forget the group's snapshot; its series vanish from the next scrape."""
        self._snapshots = {g: s for g, s in self._snapshots.items() if g != group}

    def describe(self) -> Iterable[Metric]:
        """Reserve the name in the registry."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """One sample per group, topic and partition of the stored snapshots."""
        family = self._family()
        for group, snapshot in sorted(self._snapshots.items()):
            for (topic, partition), lag in sorted(snapshot.items()):
                family.add_metric([group, topic, str(partition)], float(lag))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{NAMESPACE}_consumer_lag",
            "Messages between a consumer group's committed offset and the partition end.",
            labels=["group", "topic", "partition"],
        )


class Metrics:
    """All metrics of one worker, registered in `self.registry` (never the global one).

    Recording methods are cheap, synchronous and safe to call from the event loop or
    from threads (prometheus_client's metrics are thread-safe). They raise only for
    programming errors: an unknown phase, or a negative count.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        gpu_modules: Mapping[str, ModuleType] | None = None,
    ) -> None:
        """Create and register every metric.

        `registry`: where to register (a fresh `CollectorRegistry` by default).
        `gpu_modules`: where the GPU collector looks for an imported torch (default
        `sys.modules`; tests pass a mapping).
        """
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        ns = NAMESPACE
        self._events_in = Counter(
            "events_in", "Input messages taken by an agent.", ["topic"], namespace=ns, registry=r
        )
        self._events_out = Counter(
            "events_out",
            "Output messages acknowledged by the broker.",
            ["topic"],
            namespace=ns,
            registry=r,
        )
        self._dead_letters = Counter(
            "dead_letters",
            "Events written to the dead-letter topic, by error code and phase.",
            ["code", "name", "stage"],
            namespace=ns,
            registry=r,
        )
        self._batch_size = Histogram(
            "batch_size",
            "Messages per micro-batch handed to a handler.",
            ["agent"],
            buckets=BATCH_SIZE_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self._phase_seconds = Histogram(
            "phase_seconds",
            "Wall time of one pipeline phase for one batch.",
            ["phase"],
            buckets=PHASE_BUCKETS,
            namespace=ns,
            registry=r,
        )
        for phase in PHASES:  # every phase is exported from the start, at zero
            self._phase_seconds.labels(phase=phase)
        self._model_retries = Counter(
            "model_retries",
            "Model attempts after the first (answer unparsable or invalid).",
            namespace=ns,
            registry=r,
        )
        self._model_failures = Counter(
            "model_failures",
            "Requests the model could not answer, by error code name.",
            ["code"],
            namespace=ns,
            registry=r,
        )
        self._image_errors = Counter(
            "image_errors",
            "Image downloads or decodes that failed, by error code name.",
            ["code"],
            namespace=ns,
            registry=r,
        )
        self._cache_hits = Counter(
            "vision_cache_hits", "Vision results served from cache.", namespace=ns, registry=r
        )
        self._cache_misses = Counter(
            "vision_cache_misses", "Vision results not in cache.", namespace=ns, registry=r
        )
        self._lag_failures = Counter(
            "consumer_lag_refresh_failures",
            "Lag refreshes that raised; the group's lag is absent until the next success.",
            ["group"],
            namespace=ns,
            registry=r,
        )
        self._sink_failed_rows = Counter(
            "sink_failed_rows",
            "Rows ClickHouse rejected even alone, recorded in sink_failures (sink only).",
            namespace=ns,
            registry=r,
        )
        self._ready = Gauge(
            "worker_ready",
            "1 when the worker passes its readiness checks.",
            namespace=ns,
            registry=r,
        )
        self._lag = ConsumerLagCollector()
        r.register(self._lag)
        r.register(GpuMemoryCollector(gpu_modules))

    # ------------------------------------------------------------------ recording

    def count_in(self, topic: str, n: int = 1) -> None:
        """Count `n` input messages taken from `topic`; `ValueError` if `n < 0`."""
        self._events_in.labels(topic=topic).inc(_count(n))

    def count_out(self, topic: str, n: int = 1) -> None:
        """Count `n` outputs to `topic` acknowledged by the broker; `ValueError` if `n < 0`."""
        self._events_out.labels(topic=topic).inc(_count(n))

    def count_sink_failed_rows(self, n: int = 1) -> None:
        """Count `n` rows the sink recorded in `sink_failures`; `ValueError` if `n < 0`."""
        self._sink_failed_rows.inc(_count(n))

    def count_dead_letter(self, code: int, name: str, stage: str) -> None:
        """Count one dead letter (`code`/`name` from `ErrorCode`, `stage` from `Failure`)."""
        self._dead_letters.labels(code=str(int(code)), name=name, stage=stage).inc()

    def observe_batch(self, agent: str, size: int) -> None:
        """Record the size of one micro-batch taken by `agent`; `ValueError` if negative."""
        self._batch_size.labels(agent=agent).observe(_count(size))

    def observe_phase(self, phase: str, seconds: float) -> None:
        """Record a duration measured elsewhere; `ValueError` for a phase not in `PHASES`."""
        self._phase_seconds.labels(phase=_phase(phase)).observe(seconds)

    @contextmanager
    def time_phase(self, phase: str) -> Iterator[None]:
        """Time the `with` block as `phase`, also when it raises (the time was spent).

        `ValueError` on entry for a phase not in `PHASES`.
        """
        child = self._phase_seconds.labels(phase=_phase(phase))
        started = time.perf_counter()
        try:
            yield
        finally:
            child.observe(time.perf_counter() - started)

    def count_retry(self, n: int = 1) -> None:
        """Count `n` model attempts beyond the first."""
        self._model_retries.inc(_count(n))

    def count_model_failure(self, code: ErrorCode | str) -> None:
        """Count one request the model could not answer, labelled by the code's name."""
        self._model_failures.labels(code=_code_name(code)).inc()

    def count_image_error(self, code_name: ErrorCode | str) -> None:
        """Count one failed image download or decode, labelled by the code's name."""
        self._image_errors.labels(code=_code_name(code_name)).inc()

    def count_cache_hit(self, n: int = 1) -> None:
        """Count `n` vision results served from cache."""
        self._cache_hits.inc(_count(n))

    def count_cache_miss(self, n: int = 1) -> None:
        """Count `n` vision results that had to be computed."""
        self._cache_misses.inc(_count(n))

    def set_ready(self, ready: bool) -> None:
        """Set `worker_ready` to 1 or 0 (the `/metrics` view does this on every scrape)."""
        self._ready.set(1 if ready else 0)

    async def refresh_lag(self, group: str, lag: LagFunction) -> bool:
        """Run `lag()` in a thread and store its result as `group`'s consumer lag.

        Returns True on success. When `lag()` raises, the failure is logged and
        counted, the group's lag series are removed (a stale lag would look healthy)
        and False is returned; nothing propagates, so a periodic timer keeps going.
        Cancellation propagates.
        """
        try:
            snapshot = await asyncio.to_thread(lag)
        except Exception as exc:
            log.warning("consumer lag of group %s not refreshed: %s", group, exc)
            log.debug("lag function of group %s raised", group, exc_info=True)
            self._lag_failures.labels(group=group).inc()
            self._lag.clear(group)
            return False
        self._lag.replace(group, snapshot)
        return True

    # ------------------------------------------------------------------ exposition

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in exposition format, and its content type.

        Prometheus text format by default; OpenMetrics when `accept` (the request's
        Accept header) asks for it. Collection errors propagate.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def _count(n: int) -> int:
    if n < 0:
        raise ValueError(f"a count cannot be negative, got {n}")
    return n


def _code_name(code: ErrorCode | str) -> str:
    return code.name if isinstance(code, ErrorCode) else code


def _phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    return phase
