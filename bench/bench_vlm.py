"""Throughput of InternVL verification: the former one-request path against the batched engine.

Builds an InternVL2.5-1B-shaped model with random weights (InternViT-300M + Qwen2-0.5B,
real Qwen vocabulary), makes verification requests through the project's own prompt
(`processors.prompt.build_prompt`) and tiling (`processors.tiling`) code, and measures
in one process, on the same model object:

- `seed_path` (the former service's path; the key keeps its first name): one request at
  a time through `model.generate` (dynamic cache), i.e. the engine with
  `decode="generate", max_batch_size=1` (what the former service did,
  docs/former-service.md);
- `batched`: the production engine (`decode="static"`: batched vision, prefill in
  sub-batches, static KV cache, CUDA-graph decode, image-feature cache) at each batch size
  asked for; the fastest is reported as `batched`.

Both paths generate exactly `--new-tokens` tokens per request (`min_new_tokens` forces the
length; random weights would otherwise stop anywhere) on identical prepared requests.
Latency is the wall time of the engine call that served the request (the request's whole
batch for the batched path). Preprocessing (tiling + prompt) is timed separately: in the
service it runs in the tiling phase, before the engine.

Run on a GPU machine (needs torch, transformers, Pillow, torchvision; no network):

    python bench/bench_vlm.py --tokenizer-dir PATH/TO/qwen/tokenizer_files

`--smoke` runs a tiny shape on CPU in seconds (CI). The result is written as JSON under
`bench/results/`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/bench_vlm.py` from anywhere
    sys.path.insert(0, str(ROOT))

from bench.vlm_model import (  # noqa: E402 (after the path set-up above)
    FULL,
    RESULTS,
    SMOKE,
    Shape,
    build_model,
    build_tokenizer,
    device_name,
    gpu_memory,
    make_requests,
    percentile,
    tokenizer_dir,
    versions,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The benchmark's options (`--help` lists them)."""
    parser = argparse.ArgumentParser(prog="bench-vlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU (CI)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "bfloat16", "float32"), help="auto: bf16 on GPU"
    )
    parser.add_argument("--requests", type=int, help="requests of the batched runs")
    parser.add_argument("--seed-requests", type=int, help="requests of the seed path")
    parser.add_argument(
        "--batch-sizes", help="comma-separated batch sizes of the batched engine (default 128)"
    )
    parser.add_argument("--new-tokens", type=int, help="generated tokens per request")
    parser.add_argument("--text-tokens", type=int, help="target text tokens per prompt")
    parser.add_argument(
        "--vendor-images",
        type=int,
        default=0,
        help="distinct vendor images across the requests (0: every request its own, so the "
        "feature cache never hits)",
    )
    parser.add_argument("--compare", type=int, default=2, help="requests whose ids are compared")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="one more run of the last variant with prefill sub-batches of 32 and vision "
        "batches of 256 tiles",
    )
    parser.add_argument(
        "--cache-scenario",
        type=int,
        default=0,
        help="after the runs, the best variant once more on requests that share this many "
        "distinct vendor images (feature-cache hits); reported apart, never as `batched`",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="one more batched run, at the best batch size, with the engine's compile options "
        "on (compile_vision, compile_prefill, compile_decode)",
    )
    parser.add_argument(
        "--calls-of",
        type=int,
        default=0,
        help="engine calls of this many requests in the --compile and --tune runs (several "
        "batches per call: the engine overlaps the next batch's vision with this one's "
        "decode); the batch-size sweep always serves one batch per call",
    )
    parser.add_argument(
        "--decode-attention",
        default="auto",
        choices=("auto", "split", "sdpa"),
        help="the engine's decode_attention (auto: the split-key kernel on CUDA)",
    )
    parser.add_argument("--prefill-batch-size", type=int, default=16)
    parser.add_argument("--vision-batch-tiles", type=int, default=128)
    parser.add_argument("--tokenizer-dir", help="folder with the Qwen tokenizer.json")
    parser.add_argument("--out", help="JSON result path (default bench/results/vlm-<shape>.json)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- measuring


def run_engine(
    engine: Any, requests: list[Any], batch_size: int, device: str, per_call: int = 0
) -> tuple[dict[str, Any], list[list[int]]]:
    """Serve `requests` in engine calls of `per_call` requests (default: one batch each).

    A request's latency is the time from the start of its call until its batch was done
    (`engine.last_completion_s`), so it includes waiting behind earlier batches of the call.
    """
    per_call = per_call or batch_size
    engine.reset_timings()
    gpu_memory(device, reset=True)
    latencies: list[float] = []
    ids: list[list[int]] = []
    started = time.perf_counter()
    for begin in range(0, len(requests), per_call):
        chunk = requests[begin : begin + per_call]
        ids.extend(engine.generate_token_ids(chunk))
        latencies.extend(engine.last_completion_s)
    total = time.perf_counter() - started
    result = {
        "requests": len(requests),
        "batch_size": batch_size,
        "requests_per_call": per_call,
        "wall_s": round(total, 4),
        "verifications_per_s": round(len(requests) / total, 4),
        "p50_latency_s": round(percentile(latencies, 50), 4),
        "p95_latency_s": round(percentile(latencies, 95), 4),
        "timings_s": {key: round(value, 4) for key, value in engine.timings.items()},
        "peak_gpu_memory_gib": gpu_memory(device),
        "generated_tokens": [len(row) for row in ids[:4]],
    }
    return result, ids


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the most verifications per second."""
    return max(runs, key=lambda run: float(run["verifications_per_s"]))


def batched_run(
    make_engine: Any, requests: list[Any], variant: dict[str, Any], device: str
) -> tuple[dict[str, Any], list[list[int]]]:
    """Warm up on one full batch (graph capture, compilation), clear the cache, measure."""
    import gc

    import torch

    batch_size = int(variant["batch_size"])
    per_call = int(variant["per_call"]) or batch_size
    tuning = {
        key: variant[key] for key in ("prefill_batch_size", "vision_batch_tiles") if key in variant
    }
    fast = make_engine(
        decode="static",
        max_batch_size=batch_size,
        compile_vision=variant["compile"],
        compile_prefill=variant["compile"],
        compile_decode=variant["compile"],
        **tuning,
    )
    warm_started = time.perf_counter()
    fast.generate_token_ids(requests[:batch_size])
    warm_s = time.perf_counter() - warm_started
    if fast.feature_cache is not None:
        fast.feature_cache.clear()
    result, ids = run_engine(fast, requests, batch_size, device, per_call)
    cache = fast.feature_cache
    result["feature_cache"] = (
        None if cache is None else {"hits": cache.hits, "misses": cache.misses}
    )
    result["variant"] = variant
    result["compile"] = variant["compile"]
    result["prefill_batch_size"] = fast.config.prefill_batch_size
    result["vision_batch_tiles"] = fast.config.vision_batch_tiles
    decoder = fast.decoder
    result["decode_attention"] = (
        None if decoder is None else ("split" if decoder.split_attention else "sdpa")
    )
    result["compile_error"] = None if decoder is None else decoder.compile_error
    result["warm_up_s"] = round(warm_s, 3)
    del fast, cache, decoder
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result, ids


def _device_and_dtype(args: argparse.Namespace, torch: Any) -> tuple[str, Any]:
    """The device (`auto`: CUDA when there is one and not `--smoke`) and the dtype."""
    device = str(args.device)
    if device == "auto":
        device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def _variants(args: argparse.Namespace, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Each batched variant: batch size (None: the best so far), requests per call, options."""
    variants: list[dict[str, Any]] = [
        {"batch_size": size, "per_call": 0, "compile": False} for size in batch_sizes
    ]
    if args.compile:
        variants.append({"batch_size": None, "per_call": args.calls_of, "compile": True})
    if args.tune:
        variants.append(
            {
                **variants[-1],
                "batch_size": None,
                "per_call": args.calls_of,
                "prefill_batch_size": 32,
                "vision_batch_tiles": 256,
            }
        )
    return variants


def _attention(config: Any) -> str:
    # transformers keeps the resolved implementation in `_attn_implementation` (its own
    # attribute, read and set the same way by the library); there is no public accessor.
    return str(config._attn_implementation)  # noqa: SLF001


@dataclass
class _Bench:
    """One benchmark run: what is measured so far, and the result file it rewrites."""

    args: argparse.Namespace
    argv: list[str] | None
    shape: Shape
    device: str
    dtype: Any
    model: Any
    tokenizer: Any
    requests: list[Any]
    request_stats: dict[str, Any]
    build_s: float
    preprocess_s: float
    new_tokens: int
    count: int
    seed_count: int
    out: Path
    prompt_tokens: list[int] = field(default_factory=list)
    seed_result: dict[str, Any] = field(default_factory=dict)
    seed_ids: list[list[int]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    batched_ids: list[list[int]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    cache_scenario: dict[str, Any] | None = None

    def engine(self, **overrides: Any) -> Any:
        """A native engine on the shared model with the run's settings and `overrides`."""
        from processors.internvl import EngineConfig, NativeInternVLEngine

        args = self.args
        settings: dict[str, Any] = {
            "max_new_tokens": self.new_tokens,
            "min_new_tokens": self.new_tokens,
            "cuda_graphs": not args.no_cuda_graphs,
            "prefill_batch_size": args.prefill_batch_size,
            "vision_batch_tiles": args.vision_batch_tiles,
            "decode_attention": args.decode_attention,
            **overrides,
        }
        config = EngineConfig(f"{self.shape.name}-random", **settings)
        return NativeInternVLEngine.from_model(config, self.model, self.tokenizer)

    def measure_seed_path(self) -> None:
        """One request at a time through `generate` (warm-up: 2 tokens)."""
        from processors.internvl import EngineConfig, NativeInternVLEngine

        seed_engine = self.engine(decode="generate", max_batch_size=1, feature_cache_mb=0)
        self.prompt_tokens = [len(seed_engine.prompt_ids(request)) for request in self.requests]
        warm = NativeInternVLEngine.from_model(
            EngineConfig("warm", decode="generate", max_new_tokens=2), self.model, self.tokenizer
        )
        warm.generate_token_ids(self.requests[:1])
        self.seed_result, self.seed_ids = run_engine(
            seed_engine, self.requests[: self.seed_count], 1, self.device
        )
        print(f"[bench] seed path: {self.seed_result['verifications_per_s']:.4f}/s", flush=True)

    def run_variants(self, variants: list[dict[str, Any]]) -> None:
        """The batched engine per variant (warm-up: one full batch); the file after each."""
        for variant in variants:
            if variant["batch_size"] is None:
                if not self.runs:
                    break
                variant = {**variant, "batch_size": best_run(self.runs)["batch_size"]}
            try:
                result, ids = batched_run(self.engine, self.requests, variant, self.device)
            # One failed variant must not lose the others: its error is a row of the result.
            except Exception as exc:  # noqa: BLE001
                self.failures.append({**variant, "error": repr(exc)[:1000]})
                print(f"[bench] batched {variant} failed: {exc!r}", flush=True)
                continue
            self.runs.append(result)
            if not self.batched_ids:
                self.batched_ids = ids
            print(
                f"[bench] batched {variant}: {result['verifications_per_s']:.3f}/s "
                f"p50 {result['p50_latency_s']}s p95 {result['p95_latency_s']}s "
                f"timings={result['timings_s']}",
                flush=True,
            )
            self.report()

    def run_cache_scenario(self, vendor_images: int, text_tokens: int) -> None:
        """The best variant again on requests sharing `vendor_images` vendor images."""
        shared, _ = make_requests(
            self.shape, self.tokenizer, self.count, vendor_images, self.args.seed + 1, text_tokens
        )
        variant = best_run(self.runs)["variant"]
        try:
            scenario, _ = batched_run(self.engine, shared, variant, self.device)
        # The scenario is an extra: its failure is recorded in the result, the rest stays.
        except Exception as exc:  # noqa: BLE001
            self.cache_scenario = {"error": repr(exc)[:1000]}
            return
        self.cache_scenario = {"distinct_vendor_images": vendor_images, **scenario}
        print(
            f"[bench] vendor cache scenario ({vendor_images} vendor images): "
            f"{scenario['verifications_per_s']:.3f}/s {scenario['feature_cache']}",
            flush=True,
        )

    def _matches(self) -> list[dict[str, Any]]:
        matches = []
        for row in range(min(self.args.compare, self.seed_count, len(self.batched_ids))):
            a, b = self.seed_ids[row], self.batched_ids[row]
            same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            matches.append(
                {"identical": a == b, "first_difference": same, "tokens": [len(a), len(b)]}
            )
        return matches

    def _shape_report(self) -> dict[str, Any]:
        stats, prompt_tokens = self.request_stats, self.prompt_tokens
        return {
            "name": self.shape.name,
            "tiles": stats["tiles"],
            "image_tokens": stats["tiles"] * 256,
            "text_tokens": round(stats["text_tokens_mean"], 1),
            "prompt_tokens": round(statistics.fmean(prompt_tokens), 1),
            "prompt_tokens_min_max": [min(prompt_tokens), max(prompt_tokens)],
            "generated_tokens": self.new_tokens,
            "vision": self.shape.vision,
            "text": self.shape.text,
            "questions": stats["questions"],
            "distinct_vendor_images": self.args.vendor_images or self.count,
        }

    def report(self) -> dict[str, Any]:
        """Assemble the result from what was measured so far and write it (after each run)."""
        best = best_run(self.runs) if self.runs else None
        seed_rate = self.seed_result["verifications_per_s"]
        stats = self.request_stats
        result = {
            "command": "python bench/bench_vlm.py " + " ".join(self.argv or sys.argv[1:]),
            "device": device_name(self.device),
            "versions": versions(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "attention": {
                "vision": _attention(self.model.config.vision_config),
                "text": _attention(self.model.config.text_config),
            },
            "shape": self._shape_report(),
            "preprocessing": {
                "tiling_s_per_request": round(stats["tiling_s_per_request"], 5),
                "pickup_photo_pool": stats["pickup_pool"],
                "prompt_s_per_request": round(stats["prompt_s_per_request"], 5),
                "total_s": round(self.preprocess_s, 3),
                "note": "tiling (per image, on 8 threads; the sum for 1 vendor + 2 pickup "
                "images) and prompt building run before the engine and are not in its "
                "timings; tokenization is in the engine's timings",
            },
            "model_build_s": round(self.build_s, 2),
            "seed_path": self.seed_result,
            "batched": best,
            "batched_runs": self.runs,
            "batched_failures": self.failures,
            "speedup": (
                round(best["verifications_per_s"] / seed_rate, 2) if best and seed_rate else None
            ),
            "p50_latency_s": best["p50_latency_s"] if best else None,
            "p95_latency_s": best["p95_latency_s"] if best else None,
            "token_ids_seed_vs_batched": self._matches(),
            "vendor_cache_scenario": self.cache_scenario,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON result; 0 on success.

    Raises `SystemExit` naming the failures when every batched variant failed (the
    result file is written first).
    """
    args = parse_args(argv)
    # Batches of different sizes and lengths fragment the caching allocator; expandable
    # segments let freed blocks be reused across shapes (takes effect before CUDA starts).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch

    shape = SMOKE if args.smoke else FULL
    device, dtype = _device_and_dtype(args, torch)
    count = args.requests or (4 if args.smoke else 256)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("2" if args.smoke else "128")).split(",")]
    text_tokens = args.text_tokens or shape.text_tokens

    started = time.perf_counter()
    tokenizer = build_tokenizer(tokenizer_dir(args.tokenizer_dir))
    model = build_model(shape, tokenizer, device, dtype, args.seed)
    build_s = time.perf_counter() - started
    print(f"[bench] model {shape.name} on {device} built in {build_s:.1f}s", flush=True)

    pre_started = time.perf_counter()
    requests, request_stats = make_requests(
        shape, tokenizer, count, args.vendor_images, args.seed, text_tokens
    )
    bench = _Bench(
        args=args,
        argv=argv,
        shape=shape,
        device=device,
        dtype=dtype,
        model=model,
        tokenizer=tokenizer,
        requests=requests,
        request_stats=request_stats,
        build_s=build_s,
        preprocess_s=time.perf_counter() - pre_started,
        new_tokens=args.new_tokens or shape.new_tokens,
        count=count,
        seed_count=args.seed_requests or (1 if args.smoke else 2),
        out=Path(args.out) if args.out else RESULTS / f"vlm-{shape.name}.json",
    )
    bench.measure_seed_path()
    bench.run_variants(_variants(args, batch_sizes))
    if not bench.runs:
        bench.report()
        raise SystemExit(f"every batched run failed: {bench.failures}")
    if args.cache_scenario:
        bench.run_cache_scenario(args.cache_scenario, text_tokens)
    final = bench.report()
    best = final["batched"]
    print(
        f"[bench] seed {bench.seed_result['verifications_per_s']:.4f}/s | batched "
        f"{best['verifications_per_s']:.3f}/s (b={best['batch_size']}, calls of "
        f"{best['requests_per_call']}) | speedup {final['speedup']} | p50 "
        f"{best['p50_latency_s']}s p95 {best['p95_latency_s']}s -> {bench.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
