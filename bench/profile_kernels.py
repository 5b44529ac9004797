"""The vision tower, its attention per backend, and the kernels of one decode step (GPU; `--smoke` on CPU).

    python bench/profile_kernels.py --tokenizer-dir PATH --compile [--batches 64,256]

On the benchmarks' model (`vlm_model.py`: random weights, InternVL2.5-1B shape):
- `vision`: the vision tower of 1 and 8 requests (7 and 56 tiles) as the engine runs it:
  milliseconds (CUDA events, median), its top kernels, and the largest difference of its
  features from the eager tower.
- `attention`: the tower's attention alone at 56 tiles in each SDPA backend.
- `step_kernels`: one graph-replayed decode step of `SlotDecoder` at each batch for each
  count of attention splits (`--splits`, 0: auto), and the kernels of the last count
  from torch's profiler (microseconds and launches per step), largest first.
Prints one JSON object (also written to `--out`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.profile_parts import top_kernels  # noqa: E402
from bench.profile_slot import decode_steps, emit, step_at, timed  # noqa: E402
from bench.vlm_model import (  # noqa: E402
    FULL,
    SMOKE,
    build_model,
    build_tokenizer,
    make_requests,
    tokenizer_dir,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--compile", action="store_true", help="engine compile options on")
    parser.add_argument("--batches", default="", help="decode-step batches to profile")
    parser.add_argument("--parts", default="vision,attention,step_kernels")
    parser.add_argument(
        "--splits", default="0", help="decode attention splits to time (0: auto), ','-joined"
    )
    parser.add_argument("--out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for (see the module docstring); print one JSON object."""
    args = parse_args(argv)
    import torch

    from processors.internvl import EngineConfig, NativeInternVLEngine

    shape = SMOKE if args.smoke else FULL
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = build_tokenizer(tokenizer_dir(args.tokenizer_dir))
    model = build_model(shape, tokenizer, device, dtype, 0)
    pool, _ = make_requests(shape, tokenizer, 8, 0, 0, shape.text_tokens)
    compiled = args.compile and device == "cuda"
    engine = NativeInternVLEngine.from_model(
        EngineConfig(
            f"{shape.name}-random",
            feature_cache_mb=0,
            max_new_tokens=64,
            compile_vision=compiled,
            compile_prefill=compiled,
            compile_decode=compiled,
        ),
        model,
        tokenizer,
    )
    engine.load()
    out: dict[str, Any] = {"device": device, "shape": shape.name, "compiled": compiled}
    parts = set(args.parts.split(","))
    with torch.inference_mode():
        if "vision" in parts:
            out["vision"] = vision_timings(engine, pool, device)
            emit(out, args.out)
        if "attention" in parts:
            out["attention"] = attention_variants(device, dtype, 2 if args.smoke else 56)
            emit(out, args.out)
        if "step_kernels" in parts:
            batches = [
                int(b) for b in (args.batches or ("2" if args.smoke else "64,256")).split(",")
            ]
            splits = [int(n) for n in args.splits.split(",")]
            out["step_kernels"] = {}
            step_kernels(
                engine, pool, batches, device, splits, out["step_kernels"],
                functools.partial(emit, out, args.out),
            )  # fmt: skip
    print(json.dumps(out, indent=1))
    return 0


def vision_timings(engine: Any, pool: list[Any], device: str) -> dict[str, Any]:
    """Vision of 1 and 8 requests as the engine runs it, with its top kernels.

    Also the largest difference of its features from the eager (uncompiled) tower's.
    """
    import torch

    with torch.compiler.set_stance("force_eager"):
        reference = [[p.float() for p in r] for r in engine.image_features(pool[:8])]
    features = [[p.float() for p in r] for r in engine.image_features(pool[:8])]
    difference = max(
        float((a - b).abs().max())
        for request, expected in zip(features, reference, strict=True)
        for a, b in zip(request, expected, strict=True)
    )
    result: dict[str, Any] = {
        "ms": {
            str(n): timed(functools.partial(engine.image_features, pool[:n]), device)
            for n in (1, 8)
        },
        "max_difference_from_eager": difference,
        "reference_max": max(float(p.abs().max()) for r in reference for p in r),
    }
    if device == "cuda":
        rows = top_kernels(functools.partial(engine.image_features, pool[:8]), 12)
        result["top_kernels_ms"] = [(name, round(ms, 3), calls) for name, ms, calls in rows]
    return result


def attention_variants(device: str, dtype: Any, tiles: int) -> dict[str, Any]:
    """Attention of `tiles` tiles (16 heads of 64, 1,025 tokens) in each SDPA backend."""
    import torch
    import torch.nn.functional as functional
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens = 1025 if device == "cuda" else 65
    generator = torch.Generator(device=device).manual_seed(0)
    query, key, value = (
        torch.randn(
            tiles, tokens, 16, 64, device=device, dtype=dtype, generator=generator
        ).transpose(1, 2)
        for _ in range(3)
    )

    def sdpa() -> Any:
        return functional.scaled_dot_product_attention(query, key, value, scale=0.125)

    out: dict[str, Any] = {"tiles": tiles, "tokens": tokens, "default_ms": timed(sdpa, device)}
    if device == "cuda":
        backends = (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
        )
        for backend in backends:
            with sdpa_kernel([backend]):
                out[f"{backend.name.lower()}_ms"] = timed(sdpa, device)
    return out


def step_kernels(
    engine: Any,
    pool: list[Any],
    batches: list[int],
    device: str,
    splits: list[int],
    result: dict[str, Any],
    progress: Callable[[], None],
) -> None:
    """One graph-replayed decode step at each batch and each count of attention splits.

    Fills `result` with milliseconds per (splits, batch), and on CUDA for the last count
    of `splits` the step's kernels from torch's profiler (microseconds and launches per
    step); calls `progress` after each count, so a run cut short keeps what it measured.
    """
    import torch

    from processors.slot_decoder import SlotDecoder

    base = engine.decoder
    attention = base.split_key_attention
    prompt = max(len(i) for i in engine.encode_prompts(pool[:2]))
    context = -(-(prompt + 1024) // 128) * 128
    result.update(prompt_tokens=prompt, ms={})
    for count in splits:
        if attention is not None:
            attention.splits = count
        decoder = SlotDecoder(
            base,
            slots=max(batches),
            context=context,
            steps_per_round=16,
            cuda_graphs=device == "cuda",
            compile_step=engine.config.compile_decode and device == "cuda",
            ladder=batches,
        )
        steps = decode_steps(decoder, batches, prompt, device)
        result["ms"][str(count)] = {batch: row["graph"] for batch, row in steps.items()}
        result["compile_error"] = decoder.compile_error
        if count == splits[-1] and device == "cuda":
            for batch in batches:
                result[str(batch)] = profiled_step(step_at(decoder, batch, prompt))
        progress()
        del decoder
        if device == "cuda":
            torch.cuda.empty_cache()


def profiled_step(step: Callable[[], None], repeats: int = 20) -> dict[str, Any]:
    """The CUDA kernels of `repeats` calls of `step`: microseconds and launches per call."""

    def repeated() -> None:
        for _ in range(repeats):
            step()

    kernels = [
        (name, round(1000 * ms / repeats, 1), round(calls / repeats, 1))
        for name, ms, calls in top_kernels(repeated, 10_000)
    ]
    return {
        "kernel_us_per_step": round(sum(k[1] for k in kernels), 1),
        "launches_per_step": round(sum(k[2] for k in kernels), 1),
        "kernels": kernels[:30],
    }


if __name__ == "__main__":
    raise SystemExit(main())
