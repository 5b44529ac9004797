"""Open-loop load: time from arrival to answer, static batches against the slot engine.

Builds the model and requests of `bench/vlm_model.py` (InternVL2.5-1B shape, random
weights, 7 tiles, about 3,070 prompt tokens, the project's tiling and prompt code) and
serves, in one process on one model object, Poisson arrivals at each rate of `--rates`
for `--duration` seconds. Every arrival draws its answer length from a log-normal
distribution (median `--median-tokens`, sigma `--sigma`, clipped to `--min-tokens` ..
`--max-tokens`); with random weights the length is forced (min = max new tokens). The
arrival times, requests and lengths are the same for every engine.

- `static`: the batched engine (`NativeInternVLEngine`, static cache, CUDA graphs) fed
  like the agent feeds it: whenever the engine is free it takes everything that arrived
  (at most the batch cap) in one call, and every answer of the call is done when the
  call returns. A static batch decodes until its longest answer ends, so each call runs
  as many steps as its longest member's length. Each batch cap of `--static-caps` is run
  at each rate; the row kept is the one with the lowest p95.
- `slot`: `processors.slot_engine.SlotEngine`, each arrival submitted at its time.

Then the saturation throughput at the fixed shape (`--saturation-tokens` for every
request, all submitted at once): the slot engine, and the static engine in calls of
`--saturation-calls` at batch `--saturation-batch`.

The vision feature cache is off in both engines (each arrival's vendor image counts as
new; requests are drawn from a pool of `--pool` distinct ones). Writes
`bench/results/load-<shape>.json`: `rates` (one row per engine and rate: `engine`,
`arrival_per_s`, `achieved_per_s`, `p50_s`, `p95_s`, `p99_s`), `saturation_per_s`,
`device`, `versions`, `length_distribution`, and `details` (every run, GPU memory, the
slot engine's step counters). `--smoke` runs a tiny shape on CPU in seconds (CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/bench_load.py` from anywhere
    sys.path.insert(0, str(ROOT))

from bench.load_parity import parity  # noqa: E402
from bench.load_workload import (  # noqa: E402
    answer_lengths,
    arrival_times,
    slot_variants,
    static_caps,
    summary,
)
from bench.vlm_model import (  # noqa: E402 (after the path set-up above)
    FULL,
    RESULTS,
    SMOKE,
    build_model,
    build_tokenizer,
    device_name,
    gpu_memory,
    make_requests,
    tokenizer_dir,
    versions,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's options (`--help` lists them)."""
    parser = argparse.ArgumentParser(prog="bench-load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU (CI)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    parser.add_argument("--rates", help="comma-separated arrivals per second (10,20,30,40)")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per rate")
    parser.add_argument("--median-tokens", type=int)
    parser.add_argument("--sigma", type=float, default=0.5, help="log-normal sigma")
    parser.add_argument("--min-tokens", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument(
        "--static-caps",
        help='batch caps of the static engine: "64,256" at every rate, or per rate '
        '"10:64/256,30:256"',
    )
    parser.add_argument(
        "--slots", type=int, help="slot count (default SlotEngineConfig.max_slots; smoke 8)"
    )
    parser.add_argument(
        "--prefill-tokens", type=int, help="prefill per step (SlotEngineConfig's default)"
    )
    parser.add_argument(
        "--steps-per-round", type=int, help="decode steps per round (SlotEngineConfig's default)"
    )
    parser.add_argument("--saturation-requests", type=int)
    parser.add_argument("--saturation-tokens", type=int)
    parser.add_argument("--saturation-batch", type=int, help="static batch (512)")
    parser.add_argument("--saturation-calls", type=int, help="static call size (1024)")
    parser.add_argument("--pool", type=int, help="distinct prepared requests (256)")
    parser.add_argument("--compile", action="store_true", help="engine compile options on")
    parser.add_argument(
        "--fuse",
        default="on",
        choices=("off", "on", "both"),
        help="fused query/key/value and gate/up projections (EngineConfig.fuse_projections); "
        "both: the slot engine runs unfused, then fused (rows and saturation keyed 'slot-fused'; "
        "the engines after it run fused too)",
    )
    parser.add_argument(
        "--attention-splits",
        type=int,
        default=0,
        help="EngineConfig.attention_splits of both engines (0: per batch, the default)",
    )
    parser.add_argument(
        "--slot-variants",
        default="",
        help="';'-separated SlotEngineConfig overrides, each ','-joined key=N (e.g. "
        "'prefill_tokens_per_step=8192,staged_requests=64;steps_per_round=8'): the slot engine "
        "runs once per variant on the same arrivals; the first is the reported 'slot' "
        "engine, the others go to details.slot_variants (rows and saturation)",
    )
    parser.add_argument("--engines", default="static,slot", help="static, slot, both or none")
    parser.add_argument(
        "--parity",
        type=int,
        default=0,
        help="first compare this many requests' greedy ids, slot engine (staggered "
        "admission) against one-at-a-time generate (use with --dtype float32)",
    )
    parser.add_argument("--parity-tokens", type=int, default=64)
    parser.add_argument(
        "--pipeline-rate",
        type=float,
        default=0.0,
        help="also run the real pipeline (images over local HTTP) at this rate; 0: skip",
    )
    parser.add_argument("--pipeline-slots", type=int, default=128)
    parser.add_argument(
        "--pipeline-free", action="store_true", help="decode the pipeline's answers freely"
    )
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--out")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------ engines


def forced_length_static(engine: Any, cap: int) -> Any:
    """Let one static engine run each call for exactly its longest member's length.

    Benchmark-only: the decoder's buffers and graphs are made for `cap` tokens with
    `<|im_end|>` always suppressed (random weights never stop), and the number of steps
    of a call is set before it (`decoder.max_new_tokens`).
    """
    from processors.internvl import StaticGreedyDecoder

    class ForcedLength(StaticGreedyDecoder):
        def cache_length(self, prompt_length: int) -> int:
            needed = prompt_length + cap
            return -(-needed // self.length_bucket) * self.length_bucket

        def _session(self, batch: int, length: int) -> Any:
            steps, self.max_new_tokens = self.max_new_tokens, cap
            try:
                return super()._session(batch, length)
            finally:
                self.max_new_tokens = steps

    decoder = engine.decoder
    decoder.__class__ = ForcedLength
    decoder.min_new_tokens = cap
    return decoder


def run_static(
    engine: Any, pool: list[Any], picks: list[int], lengths: list[int], times: list[float], cap: int
) -> tuple[list[float], dict[str, Any]]:
    """Serve arrivals like the agent does: each call takes what arrived, up to `cap`."""
    engine.reset_timings()
    done = [0.0] * len(times)
    start = time.perf_counter()
    served = 0
    calls = 0
    while served < len(times):
        now = time.perf_counter() - start
        if times[served] > now:
            time.sleep(times[served] - now)
            now = time.perf_counter() - start
        end = served
        while end < len(times) and end - served < cap and times[end] <= now:
            end += 1
        batch = [pool[picks[index]] for index in range(served, end)]
        engine.decoder.max_new_tokens = max(lengths[served:end])
        engine.generate_token_ids(batch)
        finished = time.perf_counter() - start
        for index in range(served, end):
            done[index] = finished
        served = end
        calls += 1
    return done, {"calls": calls, "timings_s": {k: round(v, 3) for k, v in engine.timings.items()}}


def staged_difference(engine: Any, requests: list[Any]) -> float:
    """Largest difference between the features of staged tiles and of the tiles (0: equal).

    The slot engine converts and pins tiles on its preparation thread
    (`NativeInternVLEngine.stage_images`); this checks that the features are the same.
    """
    import torch

    with torch.inference_mode():
        plain = engine.image_features(requests)
        staged = engine.image_features(
            requests, staged=[engine.stage_images(request) for request in requests]
        )
    return max(
        float((mine - theirs).abs().max())
        for images, references in zip(staged, plain, strict=True)
        for mine, theirs in zip(images, references, strict=True)
    )


def run_slot(
    slot: Any, pool: list[Any], picks: list[int], lengths: list[int], times: list[float]
) -> tuple[list[float], dict[str, Any]]:
    """Submit each arrival at its time; a completion's time is taken when its future is done."""
    scheduler = slot.scheduler
    before = dict(scheduler.stats)
    host_before = dict(scheduler.phase_s)
    done = [0.0] * len(times)
    futures: list[Future[Any]] = []
    start = time.perf_counter()

    def finished(index: int) -> Any:
        def record(_: Future[Any]) -> None:
            done[index] = time.perf_counter() - start

        return record

    for index, due in enumerate(times):
        now = time.perf_counter() - start
        if due > now:
            time.sleep(due - now)
        future = slot.submit(
            pool[picks[index]], max_new_tokens=lengths[index], min_new_tokens=lengths[index]
        )
        future.add_done_callback(finished(index))
        futures.append(future)
    for future in futures:
        future.result()
    stats = {key: value - before[key] for key, value in scheduler.stats.items()}
    steps = max(1, stats["steps"])
    stats["mean_active_rows"] = round(stats["active_rows"] / steps, 1)
    stats["mean_padded_rows"] = round(stats["padded_rows"] / steps, 1)
    stats["scheduler_host_s"] = {
        key: round(value - host_before[key], 3) for key, value in scheduler.phase_s.items()
    }
    return done, stats


# --------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Plan:
    """What one run of the benchmark does: the arguments with their defaults filled in."""

    shape: Any
    device: str
    dtype: Any
    rates: list[float]
    duration: float
    median: int
    low: int
    high: int
    caps_of: dict[float, list[int]]
    caps: list[int]
    slots: int
    sat_requests: int
    sat_tokens: int
    sat_batch: int
    sat_calls: int
    pool_size: int
    engines: list[str]


def make_plan(args: argparse.Namespace) -> Plan:
    """The plan of a run: `--smoke` defaults (tiny shape, CPU) or the GPU ones."""
    import torch

    from processors.slot_records import SlotEngineConfig

    default_slots = SlotEngineConfig().max_slots
    smoke = args.smoke
    device = args.device
    if device == "auto":
        device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    caps_of = static_caps(args.static_caps or ("4" if smoke else "64,256"))
    return Plan(
        shape=SMOKE if smoke else FULL,
        device=device,
        dtype=dtype,
        rates=[float(r) for r in (args.rates or ("2" if smoke else "10,20,30,40")).split(",")],
        duration=args.duration or (2.0 if smoke else 15.0),
        median=args.median_tokens or (6 if smoke else 300),
        low=args.min_tokens or (3 if smoke else 120),
        high=args.max_tokens or (12 if smoke else 900),
        caps_of=caps_of,
        caps=sorted({cap for chosen in caps_of.values() for cap in chosen}),
        slots=args.slots or (8 if smoke else default_slots),
        sat_requests=args.saturation_requests or (8 if smoke else 1024),
        sat_tokens=args.saturation_tokens or (6 if smoke else 300),
        sat_batch=args.saturation_batch or (4 if smoke else 512),
        sat_calls=args.saturation_calls or (8 if smoke else 1024),
        pool_size=args.pool or (4 if smoke else 256),
        engines=args.engines.split(","),
    )


Workload = tuple[float, list[float], list[int], list[int]]  # rate, arrivals, lengths, picks


class LoadBench:
    """One process's model, requests and results; `report()` writes them after each run."""

    def __init__(self, args: argparse.Namespace, plan: Plan, argv: list[str] | None) -> None:
        self.args = args
        self.plan = plan
        self.argv = argv
        self.variants = slot_variants(args.slot_variants)
        check_variants(self.variants)  # a misspelt setting fails before the model is built
        self.variant = self.variants[0]  # the slot engine's (label, overrides), this run
        started = time.perf_counter()
        self.tokenizer = build_tokenizer(tokenizer_dir(args.tokenizer_dir))
        self.model = build_model(plan.shape, self.tokenizer, plan.device, plan.dtype, args.seed)
        self.pool, self.request_stats = make_requests(
            plan.shape, self.tokenizer, plan.pool_size, 0, args.seed, plan.shape.text_tokens
        )
        elapsed = time.perf_counter() - started
        print(f"[load] model and {plan.pool_size} requests in {elapsed:.1f}s", flush=True)
        name = plan.shape.name
        self.out = Path(args.out) if args.out else RESULTS / f"load-{name}.json"
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {
            "runs": [],
            "slot_engine": None,
            "warm_up_s": {},
            "slot_variants": {},
        }
        self.saturation: dict[str, float] = {}
        # Fusing changes the shared model in place (views), so unfused runs come first.
        self.fused = args.fuse == "on"

    def engine(self, **overrides: Any) -> Any:
        """A native engine on the shared model (feature cache off, `--compile` applied)."""
        from processors.internvl import EngineConfig, NativeInternVLEngine

        compile_all = self.args.compile
        settings: dict[str, Any] = {
            "feature_cache_mb": 0,
            "fuse_projections": self.fused,
            "compile_vision": compile_all,
            "compile_prefill": compile_all,
            "compile_decode": compile_all,
            "attention_splits": self.args.attention_splits,
            **overrides,
        }
        config = EngineConfig(f"{self.plan.shape.name}-random", **settings)
        return NativeInternVLEngine.from_model(config, self.model, self.tokenizer)

    def report(self) -> None:
        """Write everything measured so far to the result file."""
        plan, stats = self.plan, self.request_stats
        result = {
            "command": shlex.join(["python", "bench/bench_load.py", *(self.argv or sys.argv[1:])]),
            "rates": self.rows,
            "saturation_per_s": self.saturation,
            "device": device_name(plan.device),
            "versions": versions(),
            "length_distribution": {
                "kind": "log-normal, forced per request (min = max new tokens)",
                "median": plan.median,
                "sigma": self.args.sigma,
                "clip": [plan.low, plan.high],
            },
            "details": {
                **self.details,
                "dtype": str(plan.dtype).removeprefix("torch."),
                "tiles": stats["tiles"],
                "text_tokens": round(stats["text_tokens_mean"], 1),
                "duration_s": plan.duration,
                "pool": plan.pool_size,
                "peak_gpu_memory_gib": gpu_memory(plan.device),
            },
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    def workloads(self) -> list[Workload]:
        """Arrival times, answer lengths and requests per rate (the same for every engine)."""
        plan, seed = self.plan, self.args.seed
        workloads: list[Workload] = []
        for number, rate in enumerate(plan.rates):
            times = arrival_times(rate, plan.duration, seed + number)
            lengths = answer_lengths(
                len(times), plan.median, self.args.sigma, plan.low, plan.high, seed + 100 + number
            )
            picks = [index % plan.pool_size for index in range(len(times))]
            workloads.append((rate, times, lengths, picks))
        lengths_all = [length for _, _, lengths, _ in workloads for length in lengths]
        self.details["mean_length"] = round(statistics.fmean(lengths_all), 1)
        return workloads

    def run_slot_engine(self, workloads: list[Workload]) -> None:
        """Every rate and the saturation run on the slot engine."""
        from processors.slot_engine import SlotEngine, SlotEngineConfig

        plan, args, pool = self.plan, self.args, self.pool
        longest = max(len(ids) for ids in _encoded(self.engine, pool))
        slot_config = SlotEngineConfig(
            slots=plan.slots,
            context_length=-(-(longest + plan.high + 64) // 128) * 128,
            queue_size=max(64, plan.sat_requests),
            stop_at_json_close=False,
        )
        if args.steps_per_round:
            slot_config = _with(slot_config, steps_per_round=args.steps_per_round)
        if args.prefill_tokens:
            slot_config = _with(slot_config, prefill_tokens_per_step=args.prefill_tokens)
        slot_config = _with(slot_config, **self.variant[1])
        warm = time.perf_counter()
        slot = SlotEngine(self.engine(max_new_tokens=plan.high), slot_config)
        slot.load()
        # Warm-up: full vision and prefill groups, then single requests, so compiled layers
        # meet the shapes of the runs before the clock starts.
        burst = min(plan.slots, 64)
        futures = [slot.submit(pool[i % plan.pool_size], max_new_tokens=4) for i in range(burst)]
        for future in futures:
            future.result()
        for index in range(4):
            slot.submit(pool[index % plan.pool_size], max_new_tokens=4).result()
        self.details["warm_up_s"][f"slot {self.variant[0]}"] = round(time.perf_counter() - warm, 2)
        self.details["staged_vision_max_difference"] = staged_difference(
            slot.engine, pool[: min(4, len(pool))]
        )
        try:
            for rate, times, lengths, picks in workloads:
                done, stats = run_slot(slot, pool, picks, lengths, times)
                row = {"engine": "slot", "arrival_per_s": rate, **summary(times, done)}
                if self.args.fuse == "both":
                    row["fused"] = self.fused
                self._slot_rows().append(row)
                self.details["runs"].append({**row, "variant": self.variant[0], **stats})
                print(f"[load] slot at {rate}/s: {row} {stats}", flush=True)
                self.report()
            self._slot_saturation(slot)
        finally:
            slot.close()
        del slot
        self._release()

    @property
    def reported(self) -> bool:
        """Whether this slot run is the reported `slot` engine (the first variant)."""
        return self.variant is self.variants[0]

    def _slot_rows(self) -> list[dict[str, Any]]:
        """Where this run's rows go: `rows` for the first variant, else its own entry."""
        if self.reported:
            return self.rows
        rows: list[dict[str, Any]] = self._variant_entry()["rows"]
        return rows

    def _variant_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = self.details["slot_variants"].setdefault(
            self.variant[0], {"overrides": self.variant[1], "rows": []}
        )
        return entry

    def _slot_saturation(self, slot: Any) -> None:
        plan = self.plan
        n = plan.sat_requests
        picks = [i % plan.pool_size for i in range(n)]
        done, stats = run_slot(slot, self.pool, picks, [plan.sat_tokens] * n, [0.0] * n)
        key = "slot-fused" if self.args.fuse == "both" and self.fused else "slot"
        per_s = round(n / max(done), 3)
        if self.reported:
            self.saturation[key] = per_s
            self.details[f"saturation_{key}"] = stats
        else:
            self._variant_entry().update(saturation_per_s=per_s, saturation=stats)
        print(f"[load] {key} {self.variant[0]} saturation {per_s}/s {stats}", flush=True)
        scheduler = slot.scheduler
        assert scheduler is not None
        engine_details = {
            "slots": scheduler.slots,
            "context": scheduler.decoder.context,
            "ladder": scheduler.decoder.ladder,
            "split_attention": scheduler.decoder.split_attention,
            "compile_error": scheduler.decoder.compile_error,
            "prefill_capture_error": scheduler.decoder.prefill.capture_error,
            "mixed_capture_error": scheduler.mixer.capture_error if scheduler.mixer else None,
            "config": dataclasses.asdict(scheduler.config),  # budget, round, ... as run
        }
        if self.reported:
            self.details["slot_engine"] = engine_details
        else:
            self._variant_entry()["slot_engine"] = engine_details

    def run_static_engine(self, workloads: list[Workload]) -> None:
        """Every rate at each batch cap (the lowest p95 kept) and the saturation run."""
        plan, pool = self.plan, self.pool
        static = self.engine(
            max_new_tokens=plan.high,
            min_new_tokens=plan.high,
            max_batch_size=max([*plan.caps, plan.sat_batch]),
        )
        forced = forced_length_static(static, max(plan.high, plan.sat_tokens))
        warm = time.perf_counter()
        # Single and small calls too: compiled layers specialise on one row, and calls
        # under load hold a few requests (the full-batch warm-up alone left the first
        # rate's calls to pay those compilations).
        for cap in sorted({1, 2, *plan.caps}):
            forced.max_new_tokens = 4
            static.generate_token_ids([pool[i % plan.pool_size] for i in range(cap)])
        self.details["warm_up_s"]["static"] = round(time.perf_counter() - warm, 2)
        for rate, times, lengths, picks in workloads:
            best: dict[str, Any] | None = None
            for cap in plan.caps_of.get(rate, plan.caps_of.get(0.0, plan.caps)):
                static.config = _with(static.config, max_batch_size=cap)
                done, info = run_static(static, pool, picks, lengths, times, cap)
                row = {"engine": "static", "arrival_per_s": rate, **summary(times, done)}
                self.details["runs"].append({**row, "cap": cap, **info})
                print(f"[load] static cap {cap} at {rate}/s: {row}", flush=True)
                if best is None or row["p95_s"] < best["p95_s"]:
                    best = row
            assert best is not None
            self.rows.append(best)
            self.report()
        self._static_saturation(static, forced)
        del static, forced
        self._release()

    def _static_saturation(self, static: Any, forced: Any) -> None:
        plan = self.plan
        static.config = _with(static.config, max_batch_size=plan.sat_batch)
        sat = [self.pool[i % plan.pool_size] for i in range(plan.sat_requests)]
        forced.max_new_tokens = 4  # warm-up of the saturation batch (capture, allocation)
        static.generate_token_ids(sat[: plan.sat_batch])
        forced.max_new_tokens = plan.sat_tokens
        began = time.perf_counter()
        for first in range(0, plan.sat_requests, plan.sat_calls):
            static.generate_token_ids(sat[first : first + plan.sat_calls])
        self.saturation["static"] = round(plan.sat_requests / (time.perf_counter() - began), 3)
        self.details["saturation_static"] = {"batch": plan.sat_batch, "calls_of": plan.sat_calls}
        print(f"[load] static saturation {self.saturation['static']}/s", flush=True)
        self.report()

    def run_pipeline(self) -> None:
        """The real pipeline at `--pipeline-rate` on its own slot engine (`bench.load_pipeline`).

        Answers are constrained (the worker's default) unless `--pipeline-free`; free
        answers of the random model are invalid, so each event then takes two attempts.
        """
        import tempfile

        from bench.load_pipeline import (
            PICKUP_IMAGES,
            VENDOR_IMAGES,
            image_server,
            run_pipeline,
            write_images,
        )
        from processors.slot_engine import SlotEngine, SlotEngineConfig

        plan, args = self.plan, self.args
        free = args.pipeline_free
        budget = plan.high if free else 4000
        slot = SlotEngine(
            self.engine(max_new_tokens=budget, constrained_decoding=not free),
            SlotEngineConfig(slots=args.pipeline_slots, queue_size=256),
        )
        warm = time.perf_counter()
        slot.load()
        times = arrival_times(args.pipeline_rate, plan.duration, args.seed + 999)
        questions = int(self.request_stats["questions"])
        try:
            with tempfile.TemporaryDirectory() as root:
                write_images(Path(root), VENDOR_IMAGES, PICKUP_IMAGES, args.seed)
                with image_server(Path(root)) as base:
                    # Warm-up: every question set's grammar, a burst, then a single event.
                    run_pipeline(slot, [0.0] * 24, questions, base)
                    run_pipeline(slot, [0.0], questions, base)
                    self.details["warm_up_s"]["pipeline"] = round(time.perf_counter() - warm, 2)
                    done, info = run_pipeline(slot, times, questions, base)
        finally:
            slot.close()
        row = {"arrival_per_s": args.pipeline_rate, **summary(times, done)}
        self.details["pipeline"] = {
            **row,
            **info,
            "slots": args.pipeline_slots,
            "decoding": "free" if free else "constrained",
            "max_new_tokens": budget,
        }
        print(f"[load] pipeline: {self.details['pipeline']}", flush=True)
        self.report()
        del slot
        self._release()

    def _release(self) -> None:
        """Drop the last engine's device memory before the next engine is built."""
        import torch

        gc.collect()
        if self.plan.device.startswith("cuda"):
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """Run the load benchmark (arrival rates, saturation) and write its JSON result."""
    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    plan = make_plan(args)
    bench = LoadBench(args, plan, argv)
    if args.parity:
        bench.details["parity"] = parity(
            bench.engine,
            bench.pool,
            args.parity,
            args.parity_tokens,
            args.seed,
            bench.variant[1],
        )
        print(f"[load] parity {bench.details['parity']}", flush=True)
        bench.report()
    workloads = bench.workloads()
    if "slot" in plan.engines:
        for variant in bench.variants:
            bench.variant = variant
            bench.run_slot_engine(workloads)
        bench.variant = bench.variants[0]
        if args.fuse == "both":
            import torch

            # The fused run's compiled layers guard on other attributes: room for their
            # compilations beside the unfused ones (dynamo's default limit is 8).
            torch._dynamo.config.recompile_limit = 64  # noqa: SLF001
            bench.fused = True
            bench.run_slot_engine(workloads)
    if "static" in plan.engines:
        bench.run_static_engine(workloads)
    if args.pipeline_rate > 0:
        bench.run_pipeline()
    bench.report()
    print(
        f"[load] {json.dumps(bench.rows)} saturation {bench.saturation} -> {bench.out}", flush=True
    )
    return 0


def check_variants(variants: list[tuple[str, dict[str, int]]]) -> None:
    """Raise `SystemExit` naming any `--slot-variants` key that is not a SlotEngineConfig field."""
    from processors.slot_engine import SlotEngineConfig

    fields = {field.name for field in dataclasses.fields(SlotEngineConfig)}
    for label, overrides in variants:
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise SystemExit(f"--slot-variants {label!r}: not SlotEngineConfig settings: {unknown}")


def _with(config: Any, **changes: Any) -> Any:
    return dataclasses.replace(config, **changes)


def _encoded(make_engine: Any, pool: list[Any]) -> list[list[int]]:
    encoded: list[list[int]] = make_engine().encode_prompts(pool)
    return encoded


if __name__ == "__main__":
    raise SystemExit(main())
