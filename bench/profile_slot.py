"""Where the slot engine's time goes, part by part (GPU; `--smoke` runs on CPU).

    python bench/profile_slot.py --tokenizer-dir PATH [--smoke] [--batches 16,64,256,512]

Times, with CUDA events (median of several runs after warm-up), on `vlm_model.py`'s model:
one decode step of `processors.slot_decoder.SlotDecoder` at each batch size (graph
replay, and with the compiled layer), a batched prefill of whole prompts, and the
vision tower on a few requests. Then a short saturation run of the slot engine with the
host time of each scheduler phase, and the share of wall time the GPU was busy
(profiler kernel time over wall time). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.vlm_model import (  # noqa: E402
    FULL,
    SMOKE,
    build_model,
    build_tokenizer,
    make_requests,
    tokenizer_dir,
)


def timed(function: Callable[[], Any], device: str, repeats: int = 5, warmup: int = 2) -> float:
    """Median milliseconds of `function` (CUDA events on the GPU, wall time on the CPU)."""
    import torch

    for _ in range(warmup):
        function()
    times: list[float] = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            function()
            times.append(1000 * (time.perf_counter() - began))
    return round(statistics.median(times), 3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--batches", default="")
    parser.add_argument("--saturation", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="engine compile options on")
    parser.add_argument("--saturation-only", action="store_true", help="skip the part timings")
    parser.add_argument("--out", help="also write the JSON here after every section")
    parser.add_argument(
        "--no-vision-variants", action="store_true", help="skip the vision compile variants"
    )
    parser.add_argument("--modes", default="spans", help="saturation runs: spans,kernels,cprofile")
    parser.add_argument("--slots", type=int, default=0, help="saturation slots (largest batch)")
    parser.add_argument(
        "--variants",
        default="base",
        help="saturation variants, ';'-separated, each ','-joined of: base, fused (query/key/"
        "value and gate/up fused), budget=N (prefill tokens per step), vision=N (requests "
        "per vision call)",
    )
    parser.add_argument(
        "--green",
        default="",
        help="with --overlap: also run the vision on a green context of each of these "
        "SM counts (torch.cuda.green_contexts) beside decode steps on the whole GPU",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=0,
        help="also time decode steps at this batch beside vision + prefill on a second stream",
    )
    parser.add_argument(
        "--constrained",
        type=int,
        default=0,
        help="only time constrained decoding with forced runs on this many slots",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Time the slot engine part by part (see the module docstring); print one JSON object."""
    args = parse_args(argv)
    if args.constrained:
        return profile_constrained(args)
    import torch

    from processors.internvl import EngineConfig, NativeInternVLEngine

    shape = SMOKE if args.smoke else FULL
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    batches = [
        int(b) for b in (args.batches or ("2,4" if args.smoke else "16,64,256,512")).split(",")
    ]
    tokenizer = build_tokenizer(tokenizer_dir(args.tokenizer_dir))
    model = build_model(shape, tokenizer, device, dtype, 0)
    pool, _ = make_requests(shape, tokenizer, 16, 0, 0, shape.text_tokens)
    out: dict[str, Any] = {"device": device, "shape": shape.name}
    compiled = args.compile and device.startswith("cuda")
    engine = NativeInternVLEngine.from_model(
        EngineConfig(
            f"{shape.name}-random",
            feature_cache_mb=0,
            max_new_tokens=64,
            compile_vision=compiled,
            compile_prefill=compiled,
            compile_decode=compiled,
            fuse_projections=False,  # the fused variants fuse in place (`set_fused`)
        ),
        model,
        tokenizer,
    )
    engine.load()
    prompt = max(len(i) for i in engine.encode_prompts(pool[:8]))
    context = -(-(prompt + 1024) // 128) * 128
    out["prompt_tokens"] = prompt
    out["compiled"] = compiled
    if not args.saturation_only:
        out.update(time_parts(engine, pool, batches, context, device, args.compile))
    if compiled and not args.saturation_only and not args.no_vision_variants:
        out["vision_variants"] = vision_variants(engine, model, pool, device)
    emit(out, args.out)
    count = args.saturation or (8 if args.smoke else 1024)
    tokens = args.tokens or (6 if args.smoke else 300)
    slots = args.slots or max(batches)
    out["saturation"] = []
    for variant in args.variants.split(";"):
        options = parse_variant(variant)
        set_fused(engine, options.pop("fused", False))
        for mode in args.modes.split(","):
            row = saturation_run(
                engine, pool, slots, context, count, tokens, device, mode, **options
            )
            out["saturation"].append({"variant": variant, **row})
            emit(out, args.out)
    if args.overlap:  # last: a fault on two streams loses nothing measured before it
        green = tuple(int(n) for n in args.green.split(",") if n)
        out["overlap"] = overlap_parts(engine, pool, args.overlap, context, device, green=green)
        emit(out, args.out)
    print(json.dumps(out, indent=1))
    return 0


def emit(out: dict[str, Any], path: str | None) -> None:
    """Write what is measured so far to `path` (when given), replacing the last write."""
    if path:
        Path(path).write_text(json.dumps(out, indent=1))


def parse_variant(variant: str) -> dict[str, Any]:
    """`fused,budget=16384` -> {"fused": True, "budget": 16384} ("base": no options)."""
    options: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in variant.split(","))):
        name, _, value = part.partition("=")
        if name == "fused":
            options["fused"] = True
        elif name in ("budget", "vision"):
            options[name] = int(value)
        elif name != "base":
            raise SystemExit(f"unknown variant option {part!r}")
    return options


def set_fused(engine: Any, fused: bool) -> None:
    """Fuse the language model's projections in place, or stop using the fused weights."""
    from processors.internvl import fuse_layer, unfuse_layer

    for layer in engine.decoder.layers:
        (fuse_layer if fused else unfuse_layer)(layer)


def time_parts(
    engine: Any, pool: list[Any], batches: list[int], context: int, device: str, compile_too: bool
) -> dict[str, Any]:
    """Vision on 1, 4 and 8 requests, a prefill of 8 prompts, one decode step per batch."""
    import torch

    from processors.slot_decoder import SlotDecoder

    base = engine.decoder
    assert base is not None
    ids = engine.encode_prompts(pool[:8])
    prompt = max(len(i) for i in ids)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        out["vision_ms"] = {
            str(n): timed(functools.partial(engine.image_features, pool[:n]), device, repeats=3)
            for n in (1, 4, 8)
        }
        variants = [(False, False)]
        if compile_too:
            variants += [(True, False), (True, True)]
        for compiled, fused in variants:
            suffix = ("_compiled" if compiled else "") + ("_fused" if fused else "")
            if fused:
                set_fused(engine, True)  # in place, for the variants after this one too
            decoder = SlotDecoder(
                base,
                slots=max(batches),
                context=context,
                steps_per_round=16,
                cuda_graphs=device.startswith("cuda"),
                compile_step=compiled,
                ladder=batches,
            )
            features = engine.image_features(pool[:8])
            flat = torch.cat([p.reshape(-1, p.shape[-1]) for f in features for p in f])
            out[f"prefill_8_ms{suffix}"] = timed(
                functools.partial(decoder.prefill.prefill_rows, ids, flat, [0] * 8),
                device,
                repeats=3,
            )
            per_prompt = {}
            for rows in (1, 2, 4):  # milliseconds per prompt in groups of this many
                tokens = sum(ids[i].count(base.image_token_id) for i in range(rows))
                milliseconds = timed(
                    functools.partial(
                        decoder.prefill.prefill_rows, ids[:rows], flat[:tokens], [0] * rows
                    ),
                    device,
                    repeats=3,
                )
                per_prompt[str(rows)] = round(milliseconds / rows, 3)
            out[f"prefill_ms_per_prompt{suffix}"] = per_prompt
            out[f"decode_step_ms{suffix}"] = decode_steps(decoder, batches, prompt, device)
            out["compile_error"] = decoder.compile_error
            del decoder
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return out


def vision_variants(engine: Any, model: Any, pool: list[Any], device: str) -> dict[str, Any]:
    """Vision of 1, 2, 4, 8 and 16 requests: eager, layers compiled static, then dynamic.

    The slot engine calls the vision tower on groups of varying size: a layer compiled
    with static shapes compiles again for every new tile count (until dynamo's recompile
    limit, then runs eagerly). Per variant: the median milliseconds per count and the
    seconds of the first call of each count (compilation included).
    """
    import torch

    layers = model.model.vision_tower.encoder.layer
    counts = (1, 2, 4, 8, 16)
    out: dict[str, Any] = {
        "tiles": [sum(int(n) for r in pool[:c] for n in r.num_patches) for c in counts]
    }

    def measure() -> dict[str, Any]:
        first: dict[str, float] = {}
        median: dict[str, float] = {}
        for count in counts:
            began = time.perf_counter()
            engine.image_features(pool[:count])
            torch.cuda.synchronize()
            first[str(count)] = round(time.perf_counter() - began, 2)
            median[str(count)] = timed(
                functools.partial(engine.image_features, pool[:count]), device, repeats=3
            )
        return {"ms": median, "first_call_s": first}

    with torch.inference_mode():
        with torch.compiler.set_stance("force_eager"):
            out["eager"] = measure()
        out["static_compiled"] = measure()
        for layer in layers:
            layer.compile(dynamic=True)
        out["dynamic_compiled"] = measure()
        for layer in layers:  # back to the engine's own setting for the runs after this
            layer.compile(dynamic=False)
    return out


def overlap_parts(
    engine: Any,
    pool: list[Any],
    batch: int,
    context: int,
    device: str,
    steps: int = 48,
    green: tuple[int, ...] = (),
) -> dict[str, Any]:
    """Decode steps on one stream beside vision on another, against each alone.

    `steps` graph-replayed steps at `batch` rows, and the vision of 8 requests (between
    steps, a request's vision holds every row back); alone, then both queued together on
    two streams of equal priority, then, for each of `green`'s SM counts, with the vision
    on a green context of that many SMs. Milliseconds of each stream's work from the
    common start (CUDA events). Not run: the decode stream at a higher priority, which
    twice ended in "an illegal instruction was encountered" on an H200 (torch 2.11).
    """
    import torch

    from processors.slot_decoder import SlotDecoder

    if not device.startswith("cuda"):
        return {"skipped": "needs CUDA"}
    base = engine.decoder
    ids = engine.encode_prompts(pool[:2])
    prompt = max(len(i) for i in ids)
    decoder = SlotDecoder(
        base, slots=batch, context=context, steps_per_round=steps, ladder=[batch], stage_rows=2
    )
    out: dict[str, Any] = {"batch": batch, "steps": steps}
    with torch.inference_mode():
        decoder.capture_graphs()
        decoder.active.fill_(1)

        def decode() -> None:
            decoder.round_step.zero_()
            decoder.lengths.fill_(prompt)
            for _ in range(steps):
                decoder.step(batch)

        def side() -> None:
            engine.image_features(pool[:8])

        def run(decode_stream: Any, side_stream: Any, parts: tuple[str, ...]) -> dict[str, float]:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            ends = {}
            for name, work, stream in (
                ("decode", decode, decode_stream),
                ("side", side, side_stream),
            ):
                if name not in parts:
                    continue
                stream.wait_event(start)
                with torch.cuda.stream(stream):
                    work()
                    ends[name] = torch.cuda.Event(enable_timing=True)
                    ends[name].record()
            torch.cuda.synchronize()
            return {name: round(start.elapsed_time(end), 3) for name, end in ends.items()}

        plain = torch.cuda.Stream(device)
        other = torch.cuda.Stream(device)
        for _ in range(2):  # warm-up (kernel selection, allocator)
            run(plain, other, ("decode", "side"))
        out["decode_alone_ms"] = run(plain, other, ("decode",))["decode"]
        out["side_alone_ms"] = run(plain, other, ("side",))["side"]
        out["together_ms"] = run(plain, other, ("decode", "side"))
        out.update(green_overlap(run, plain, green, device))
    return out


def green_overlap(
    run: Callable[[Any, Any, tuple[str, ...]], dict[str, float]],
    plain: Any,
    green: tuple[int, ...],
    device: str,
) -> dict[str, Any]:
    """`overlap_parts`'s runs with the side work on a green context of each SM count.

    Decode stays on a stream of the whole device at the same priority.
    """
    out: dict[str, Any] = {}
    for sms in green:
        try:
            _, stream = green_stream(device, sms)  # kept for the process
        except (RuntimeError, TypeError, AttributeError, ImportError) as exc:
            out[f"green_{sms}"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        run(plain, stream, ("decode", "side"))  # warm-up on this stream
        out[f"green_{sms}"] = {
            "side_alone_ms": run(plain, stream, ("side",))["side"],
            "decode_alone_ms": run(stream, plain, ("decode",))["decode"],
            "together_ms": run(plain, stream, ("decode", "side")),
        }
    return out


@functools.cache
def green_stream(device: str, sms: int) -> tuple[Any, Any]:
    """A CUDA green context of `sms` multiprocessors and a stream of it (torch's API).

    One pair per (device, sms), kept for the process: releasing a context mid-run made
    later CUDA calls fail with "context is destroyed" (H200, torch 2.11).
    """
    import torch
    from torch.cuda import green_contexts

    index = torch.device(device).index or 0
    kind: Any = green_contexts.GreenContext
    try:
        context = kind(num_sms=sms, device_id=index)
    except TypeError:  # torch before 2.14: GreenContext.create(num_sms=, device_id=)
        context = kind.create(num_sms=sms, device_id=index)
    return context, context.Stream()


def step_at(decoder: Any, batch: int, prompt: int) -> Callable[[], None]:
    """One decode step of `batch` rows of a captured `decoder`, every row at `prompt` tokens."""

    def step() -> None:
        decoder.round_step.zero_()
        decoder.lengths[:batch].fill_(prompt)
        decoder.step(batch)

    return step


def decode_steps(decoder: Any, batches: list[int], prompt: int, device: str) -> dict[str, Any]:
    """One graph-replayed step per batch size, every row at the prompt's length."""
    decoder.capture_graphs()
    decoder.lengths.fill_(prompt)
    decoder.active.fill_(1)
    return {
        str(batch): {"graph": timed(step_at(decoder, batch, prompt), device)} for batch in batches
    }


def saturation_config(slots: int, context: int, count: int, budget: int, vision: int) -> Any:
    """The slot engine's settings of a saturation run (0: the default budget / vision)."""
    from processors.slot_engine import SlotEngineConfig

    config = SlotEngineConfig(
        slots=slots, context_length=context, queue_size=count, stop_at_json_close=False
    )
    return dataclasses.replace(
        config,
        prefill_tokens_per_step=budget or config.prefill_tokens_per_step,
        vision_requests=vision or config.vision_requests,
    )


def saturation_run(
    engine: Any,
    pool: list[Any],
    slots: int,
    context: int,
    count: int,
    tokens: int,
    device: str,
    mode: str = "spans",
    budget: int = 0,
    vision: int = 0,
) -> dict[str, Any]:
    """`count` requests of `tokens` tokens at once, phases timed on the host.

    `mode`: "spans" also sums the GPU time of each scheduler phase (CUDA events, little
    overhead: the throughput is the engine's own); "kernels" runs under torch's profiler
    (its top kernels; launches cost more); "cprofile" profiles the scheduler thread's
    Python (its top functions by own time).
    """
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from processors.slot_engine import SlotEngine

    config = saturation_config(slots, context, count, budget, vision)
    slot = SlotEngine(engine, config)
    slot.load()
    scheduler = slot.scheduler
    assert scheduler is not None
    for future in [slot.submit(pool[i % 16], max_new_tokens=4) for i in range(4)]:
        future.result()
    scheduler.phase_s = dict.fromkeys(scheduler.phase_s, 0.0)
    scheduler.stats = dict.fromkeys(scheduler.stats, 0)
    python = cProfile.Profile()
    if mode == "spans" and device.startswith("cuda"):
        scheduler.gpu_spans = []
    if mode == "cprofile":
        run_round = scheduler.run_round

        def profiled(*args: Any) -> Any:
            python.enable()
            try:
                return run_round(*args)
            finally:
                python.disable()

        scheduler.run_round = profiled  # type: ignore[method-assign,assignment]
    activities = [ProfilerActivity.CUDA] if device.startswith("cuda") else [ProfilerActivity.CPU]
    began = time.perf_counter()
    with profile(activities=activities) if mode == "kernels" else contextlib.nullcontext() as prof:
        futures = [
            slot.submit(pool[i % 16], max_new_tokens=tokens, min_new_tokens=tokens)
            for i in range(count)
        ]
        for future in futures:
            future.result()
    wall = time.perf_counter() - began
    slot.close()
    out: dict[str, Any] = {
        "mode": mode,
        "slots": slots,
        "requests": count,
        "tokens": tokens,
        "per_s": round(count / wall, 3),
        "wall_s": round(wall, 3),
        "host_phase_s": {k: round(v, 3) for k, v in scheduler.phase_s.items()},
        "stats": scheduler.stats,
    }
    if scheduler.gpu_spans:
        gpu: dict[str, float] = {}
        for name, start, end in scheduler.gpu_spans:
            gpu[name] = gpu.get(name, 0.0) + start.elapsed_time(end) / 1000
        out["gpu_phase_s"] = {k: round(v, 3) for k, v in gpu.items()}  # nested phases overlap
    if prof is not None:
        out.update(_kernel_summary(prof))
    if mode == "cprofile":
        text = io.StringIO()
        pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(40)
        out["cprofile_top"] = text.getvalue().splitlines()[:70]
    return out


def _kernel_summary(prof: Any) -> dict[str, Any]:
    """GPU kernel seconds in all and the 25 kernels that took longest, from torch's profiler."""
    kernels = []
    busy = 0.0
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or 0
        if device_us > 0 and event.device_type.name == "CUDA":
            busy += device_us
            kernels.append((event.key[:80], round(device_us / 1000, 1), event.count))
    kernels.sort(key=lambda row: -row[1])
    return {"gpu_kernel_s": round(busy / 1e6, 3), "top_kernels_ms": kernels[:25]}


def profile_constrained(args: argparse.Namespace) -> int:
    """GPU time of each pass of the constrained step and host time of each phase."""
    import torch

    from bench.bench_constrained import _with_schemas
    from processors.answer_schema import FieldLimits
    from processors.internvl import EngineConfig, NativeInternVLEngine
    from processors.slot_engine import SlotEngine, SlotEngineConfig

    shape = SMOKE if args.smoke else FULL
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    slots = args.constrained
    count = args.saturation or 2 * slots
    tokenizer = build_tokenizer(tokenizer_dir(args.tokenizer_dir))
    model = build_model(shape, tokenizer, device, dtype, 0)
    plain, stats = make_requests(shape, tokenizer, count, 0, 0, shape.text_tokens)
    limits = FieldLimits(analysis=8, evidence=8, text_result=4) if args.smoke else FieldLimits()
    requests = _with_schemas(plain, int(stats["questions"]), limits)
    engine = NativeInternVLEngine.from_model(
        EngineConfig(f"{shape.name}-random", feature_cache_mb=0, max_new_tokens=4000),
        model,
        tokenizer,
    )
    prompt = max(len(engine.prompt_ids(request)) for request in requests)
    slot = SlotEngine(
        engine,
        SlotEngineConfig(
            slots=slots,
            context_length=-(-(prompt + 4064) // 128) * 128,
            queue_size=count + 8,
        ),
    )
    slot.load()
    scheduler = slot.scheduler
    assert scheduler is not None
    for future in [slot.submit(r, max_new_tokens=32) for r in requests[:slots]]:
        future.result()
    scheduler.decoder.pass_events = []
    scheduler.phase_s = dict.fromkeys(scheduler.phase_s, 0.0)
    scheduler.stats = dict.fromkeys(scheduler.stats, 0)
    began = time.perf_counter()
    for future in [slot.submit(r) for r in requests]:
        future.result()
    wall = time.perf_counter() - began
    slot.close()
    passes: dict[str, list[float]] = {}
    for kind, start, end in scheduler.decoder.pass_events:
        passes.setdefault(kind, []).append(start.elapsed_time(end))
    out = {
        "slots": slots,
        "requests": count,
        "per_s": round(count / wall, 3),
        "wall_s": round(wall, 3),
        "stats": scheduler.stats,
        "gpu_pass_ms": {
            kind: {
                "calls": len(times),
                "median": round(statistics.median(times), 3),
                "total_s": round(sum(times) / 1000, 3),
            }
            for kind, times in passes.items()
        },
        "host_s": {name: round(value, 3) for name, value in scheduler.phase_s.items()},
        "mask_fill_s": round(scheduler.grammars.fill_s, 3) if scheduler.grammars else None,
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
