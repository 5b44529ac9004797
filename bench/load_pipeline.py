"""The real verification pipeline under open-loop load (part of `bench/bench_load.py`).

`bench_load.py --pipeline-rate R` runs, after the engine runs, Poisson arrivals at R per
second through `processors.verification.VerificationPipeline` as the slot worker runs it:
each pickup event on its own, its images downloaded by `processors.gathering.ImageGatherer`
from a local HTTP server (one vendor JPEG, two pickup JPEGs per event, drawn from a pool),
tiled on the CPU by the project's tiling code (default `TilingConfig`: 7 tiles), its
prompt and answer schema built by the pipeline, submitted to the slot engine and decided.
So one figure holds the CPU-side costs (download, JPEG decode, tiling, prompt) with the
GPU ones. Answers are decoded as the worker decodes them (`--pipeline-constrained`: inside
each request's schema, so they parse; with random weights every free string runs to its
bound), not forced to a length: the latency row states the answer length measured.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.vlm_model import questions_for

#: Distinct images served: events draw their vendor and pickup photos from these.
VENDOR_IMAGES = 64
PICKUP_IMAGES = 16


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        """Drop the access log."""


@contextmanager
def image_server(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1 (a free port) while the block runs; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def write_images(root: Path, vendors: int, pickups: int, seed: int) -> None:
    """Random-noise JPEGs (quality 90): `v{i}.jpg` 448x448 and `p{i}.jpg` 896x448."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, count, size in (("v", vendors, (448, 448)), ("p", pickups, (896, 448))):
        for index in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"{name}{index}.jpg", quality=90)


def pickup_events(
    count: int, base: str, vendors: int, pickups: int, questions: int
) -> list[dict[str, Any]]:
    """`count` pickup-completed events whose images are URLs on `base`.

    Three question sets (`questions` - 1 to + 1 questions), as returns of a few products.
    """
    events = []
    for n in range(count):
        events.append(
            {
                "event_id": f"load-{n}",
                "occurred_at": 1_763_800_000_000 + n,
                "pickupproductimage": [f"{base}/v{n % vendors}.jpg"],
                "skupickdone": [f"{base}/p{(n + k) % pickups}.jpg" for k in range(2)],
                "productname": "Cotton shirt, navy, size XL",
                "question": json.dumps(questions_for(n, max(1, questions + n % 3 - 1))),
                "shippingid": f"SHP-L{n:06d}",
                "productid": f"P-{n % 97}",
                "uuid": f"load-{n:06d}",
                "previousuuid": None,
            }
        )
    return events


@dataclass
class PipelineLoad:
    """What one pipeline run measured (arrival to outcome, per event)."""

    done: list[float]
    decisions: int
    failures: dict[str, int]
    phase_s: dict[str, float]


async def drive(engine: Any, events: list[dict[str, Any]], times: list[float]) -> PipelineLoad:
    """Feed each event to its own pipeline run at its arrival time; wait for every outcome."""
    from processors.gather_limits import GatherLimits
    from processors.gathering import ImageGatherer
    from processors.records import PickupRequest
    from processors.tiling import TilingConfig
    from processors.verification import VerificationInput, VerificationPipeline

    phases: dict[str, float] = {}

    def observe(phase: str, seconds: float) -> None:
        phases[phase] = phases.get(phase, 0.0) + seconds

    gatherer = ImageGatherer(GatherLimits(allow_loopback=True))
    await gatherer.start()
    pipeline = VerificationPipeline(
        engine, images=gatherer, tiling=TilingConfig(), on_phase=observe
    )
    done = [0.0] * len(times)
    outcomes: list[Any] = [None] * len(times)
    start = time.perf_counter()

    async def one(index: int) -> None:
        request = PickupRequest.from_event(events[index])
        result = await pipeline.run([VerificationInput(request)], batch_id=f"load-{index}")
        outcomes[index] = result[0]
        done[index] = time.perf_counter() - start

    tasks = []
    try:
        for index, due in enumerate(times):
            delay = due - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index)))
        await asyncio.gather(*tasks)
    finally:
        await gatherer.close()
    failures = Counter(
        str(int(outcome.failure.code)) for outcome in outcomes if outcome.failure is not None
    )
    return PipelineLoad(
        done=done,
        decisions=sum(1 for outcome in outcomes if outcome.decision is not None),
        failures=dict(failures),
        phase_s={name: round(value / max(1, len(times)), 4) for name, value in phases.items()},
    )


def run_pipeline(
    engine: Any, times: list[float], questions: int, base: str
) -> tuple[list[float], dict[str, Any]]:
    """Run the pipeline over arrivals `times` on a loaded slot engine, images from `base`.

    `base` serves the images of `write_images` (see `image_server`). Returns each event's
    outcome time (seconds from the first arrival's clock start) and the details:
    outcomes (decisions, failures by code), the pipeline's mean phase seconds per event,
    and the engine's decode steps and forced tokens per event.
    """
    scheduler = engine.scheduler
    before = dict(scheduler.stats)
    events = pickup_events(len(times), base, VENDOR_IMAGES, PICKUP_IMAGES, questions)
    load = asyncio.run(drive(engine, events, times))
    stats = {key: value - before[key] for key, value in scheduler.stats.items()}
    count = max(1, len(times))
    return load.done, {
        "events": len(times),
        "decisions": load.decisions,
        "failures_by_code": load.failures,
        "mean_phase_s_per_event": load.phase_s,
        "decode_steps_per_event": round(stats["active_rows"] / count, 1),
        "forced_tokens_per_event": round(stats["forced_tokens"] / count, 1),
    }
