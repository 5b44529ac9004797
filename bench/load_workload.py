"""The load benchmark's workload: arrivals, answer lengths, latency summary, run variants.

Pure functions of their arguments and seeds (`bench/bench_load.py` draws the same
workload for every engine from them).
"""

from __future__ import annotations

import math

from bench.vlm_model import percentile


def answer_lengths(
    count: int, median: int, sigma: float, low: int, high: int, seed: int
) -> list[int]:
    """`count` lengths from a log-normal (median, sigma), clipped to [low, high]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = rng.lognormal(math.log(median), sigma, count)
    return [int(min(high, max(low, round(value)))) for value in draws]


def slot_variants(spec: str) -> list[tuple[str, dict[str, int]]]:
    """`--slot-variants` as (label, SlotEngineConfig overrides); one empty variant at least.

    An empty item is the default settings (";x=1": the default first); a trailing ';' adds none.
    """
    variants = []
    items = spec.rstrip(";")
    for text in items.split(";") if items else [""]:
        pairs = [item.split("=", 1) for item in text.split(",") if item]
        variants.append((text or "default", {key.strip(): int(value) for key, value in pairs}))
    return variants


def arrival_times(rate: float, duration: float, seed: int) -> list[float]:
    """Poisson arrivals (exponential gaps) in [0, duration)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    times: list[float] = []
    now = float(rng.exponential(1 / rate))
    while now < duration:
        times.append(now)
        now += float(rng.exponential(1 / rate))
    return times


def summary(arrivals: list[float], done: list[float]) -> dict[str, float]:
    """Throughput and latency percentiles from arrival and completion times (seconds)."""
    latencies = [end - start for start, end in zip(arrivals, done, strict=True)]
    span = max(done) - min(arrivals) if done else 0.0
    return {
        "achieved_per_s": round(len(done) / span, 3) if span > 0 else 0.0,
        "p50_s": round(percentile(latencies, 50), 3),
        "p95_s": round(percentile(latencies, 95), 3),
        "p99_s": round(percentile(latencies, 99), 3),
    }


def static_caps(spec: str) -> dict[float, list[int]]:
    """Batch caps per rate: "64,256" (every rate) or "10:64/256,30:256" (0.0: every rate)."""
    out: dict[float, list[int]] = {}
    for item in spec.split(","):
        if ":" in item:
            rate, caps = item.split(":")
            out[float(rate)] = [int(cap) for cap in caps.split("/")]
        else:
            out.setdefault(0.0, []).append(int(item))
    return out
