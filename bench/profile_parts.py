"""Each stage of the batched InternVL engine timed alone, in variants (GPU only).

The end-to-end benchmark (`bench_vlm.py`) says how fast the engine is; this script says
where the time goes: the vision tower on a batch of tiles, one prefill sub-batch and one
decode step, each timed with CUDA events (median of several runs after warm-up), with
the top kernels of each from the PyTorch profiler. Variants are named on the command line:

    python bench/profile_parts.py --tokenizer-dir PATH [--parts vision,prefill,decode]

Achieved TFLOP/s are printed next to the times so they can be read against the GEMM
ceiling measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import gc
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

from bench.vlm_model import FULL, build_model, build_tokenizer, tokenizer_dir  # noqa: E402


def timed(function: Callable[[], Any], repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of `function` on the GPU (CUDA events)."""
    import torch

    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times: list[float] = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def top_kernels(function: Callable[[], Any], count: int = 12) -> list[tuple[str, float, int]]:
    """(kernel name, total ms, calls) of one run of `function`, largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    function()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            rows.append((event.key[:90], device_us / 1000, event.count))
    rows.sort(key=lambda row: -row[1])
    return rows[:count]


def print_kernels(title: str, rows: list[tuple[str, float, int]]) -> None:
    """Print the rows of `top_kernels` under `title`."""
    total = sum(row[1] for row in rows)
    print(f"  top kernels of {title} (sum of these {total:.2f} ms):")
    for name, ms, calls in rows:
        print(f"    {ms:9.3f} ms {calls:6d}x  {name}")


def replay_at(session: Any, column: int) -> None:
    """Replay a decode session's graph as the step that writes `column`."""
    session.column.fill_(column)
    session.graph.replay()


# torch raises RuntimeError when no kernel of the chosen attention backend fits (not
# built for this GPU, or not for this shape), and so do the compilers' failures.
_BACKEND_ERRORS = (RuntimeError,)
_DECODER_OPTIONS: dict[str, Any] = {"eos_id": 0, "max_new_tokens": 300, "length_bucket": 128}


class _Results:
    """The timings printed and collected for `--out`."""

    def __init__(self, device: str) -> None:
        self.results: dict[str, Any] = {"device": device}

    def report(self, key: str, seconds: float, flop: float | None = None) -> None:
        """Print and record one timing, with TFLOP/s when its FLOP count is given."""
        rate = f"  {flop / seconds / 1e12:6.1f} TFLOP/s" if flop else ""
        print(f"{key:48s} {seconds * 1000:9.3f} ms{rate}", flush=True)
        self.results[key] = {"ms": round(seconds * 1000, 3)}
        if flop:
            self.results[key]["tflops"] = round(flop / seconds / 1e12, 1)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--parts", default="gemm,vision,prefill,decode")
    parser.add_argument("--vision-tiles", type=int, default=256)
    parser.add_argument("--prefill-rows", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=3200)
    parser.add_argument("--decode-batch", type=int, default=256)
    parser.add_argument("--cache-length", type=int, default=3584)
    parser.add_argument("--out")
    return parser.parse_args(argv)


def _gemm(out: _Results, args: argparse.Namespace) -> None:
    """The GEMM ceiling, and the vision MLP's first matmul alone."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out.report("gemm 8192^3", timed(lambda: a @ b), 2 * 8192**3)
    x = torch.randn(args.vision_tiles * 1025, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    out.report("gemm vision fc1", timed(lambda: x @ w.t()), 2 * x.shape[0] * 1024 * 4096)


def _vision(out: _Results, model: Any, args: argparse.Namespace) -> None:
    """The vision tower eager, per attention backend, with the patch matmul, compiled."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from processors.internvl import patch_projection_as_matmul

    vision_model = model.model
    config = model.config
    pixels = torch.randn(args.vision_tiles, 3, 448, 448, device="cuda", dtype=torch.bfloat16)
    tile_flop = 24 * 1025 * 2 * (4 * 1024**2 + 2 * 1024 * 4096) + 24 * 4 * 1025**2 * 1024

    def vision() -> Any:
        return vision_model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )

    flop = tile_flop * args.vision_tiles
    out.report("vision eager (sdpa default)", timed(vision, 3, 1), flop)
    for name, backend in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ):
        try:
            with sdpa_kernel([backend]):
                out.report(f"vision eager ({name})", timed(vision, 3, 1), flop)
        except _BACKEND_ERRORS as exc:
            print(f"vision eager ({name}) failed: {type(exc).__name__}: {exc}"[:300])
    print_kernels("vision eager", top_kernels(vision))
    conv = model.model.vision_tower.embeddings.patch_embeddings.projection
    before = conv(pixels[:8])
    patch_projection_as_matmul(conv)
    after = conv(pixels[:8])
    print(f"  patch matmul rel. error {float((after - before).norm() / before.norm()):.2e}")
    out.report("vision eager, patch matmul", timed(vision, 3, 1), flop)
    for layer in model.model.vision_tower.encoder.layer:
        layer.compile(dynamic=False)
    started = time.perf_counter()
    vision()
    print(f"  vision compile {time.perf_counter() - started:.1f}s")
    out.report("vision compiled layers", timed(vision, 3, 1), flop)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            vision()
            out.report("vision compiled layers (cudnn)", timed(vision, 3, 1), flop)
    except _BACKEND_ERRORS as exc:
        print(f"vision compiled (cudnn) failed: {type(exc).__name__}: {exc}"[:300])
    print_kernels("vision compiled", top_kernels(vision))


def _vision_attention(out: _Results, args: argparse.Namespace) -> None:
    """The vision tower's attention alone, per backend."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(args.vision_tiles, 16, 1025, 64, device="cuda", dtype=torch.bfloat16)
    attn_flop = 4 * args.vision_tiles * 16 * 1025**2 * 64
    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with sdpa_kernel([backend]):
                out.report(
                    f"vision attention alone ({name})",
                    timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)),
                    attn_flop,
                )
        except _BACKEND_ERRORS as exc:
            print(f"attention {name} failed: {type(exc).__name__}: {exc}"[:300])


def _prefill(out: _Results, model: Any, args: argparse.Namespace) -> None:
    """One prefill sub-batch, eager and with the compiled layer."""
    import torch

    from processors.internvl import StaticGreedyDecoder

    rows, tokens = args.prefill_rows, args.prompt_tokens
    params = 24 * (896 * 2048 + 3 * 896 * 4864)
    flop = rows * (2 * params * tokens + 24 * 2 * tokens**2 * 896)
    input_ids = torch.randint(0, 150000, (rows, tokens), device="cuda")
    lengths = torch.full((rows,), tokens, device="cuda")
    for compiled in (False, True):
        decoder = StaticGreedyDecoder(
            model, compile_prefill=compiled, cuda_graphs=False, **_DECODER_OPTIONS
        )
        session = decoder.session(rows, tokens)

        prefill = functools.partial(decoder.prefill, session, 0, input_ids, lengths, None)

        name = "prefill (compiled layer)" if compiled else "prefill (eager layer)"
        started = time.perf_counter()
        prefill()
        torch.cuda.synchronize()
        print(f"  {name} first call {time.perf_counter() - started:.1f}s")
        out.report(name, timed(prefill, 3, 1), flop)
        print_kernels(name, top_kernels(prefill, 8))
        del decoder, session
        torch.cuda.empty_cache()


def _decode_attention(out: _Results, args: argparse.Namespace) -> None:
    """The decode step's attention: dense SDPA against split-key kernel settings."""
    import torch

    from processors.internvl import SplitKeyAttention

    length = args.cache_length
    prompt = length - 300
    for batch in (args.decode_batch, 2 * args.decode_batch):
        shape = (batch, 2, length, 64)
        keys = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        values = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        query = torch.randn(batch, 2, 7, 64, device="cuda", dtype=torch.bfloat16)
        lengths = torch.randint(prompt - 400, prompt + 1, (batch,), device="cuda")
        prompt_end = torch.tensor(prompt, device="cuda")
        column = torch.tensor(prompt + 150, device="cuda")
        columns = torch.arange(length, device="cuda")[None, :]
        visible = (columns < lengths[:, None]) | ((columns >= prompt) & (columns <= column))
        mask = visible[:, None, None, :]
        read = int(visible.sum()) * 2 * 2 * 64 * 2

        dense = functools.partial(
            torch.nn.functional.scaled_dot_product_attention,
            query,
            keys,
            values,
            attn_mask=mask,
            scale=0.125,
        )

        reference = dense().float()
        seconds = timed(dense, 20, 3)
        out.report(f"decode attention B={batch} sdpa", seconds)
        for splits, block_n, warps in (
            (1, 64, 4),
            (1, 128, 4),
            (1, 128, 8),
            (2, 64, 4),
            (2, 128, 4),
        ):
            kernel = SplitKeyAttention(splits=splits, block_n=block_n, num_warps=warps)
            split = functools.partial(
                kernel, query, keys, values, lengths, prompt_end, column, 0.125
            )
            result = split().float()
            error = float((result - reference).norm() / reference.norm())
            seconds = timed(split, 20, 3)
            out.report(f"decode attention B={batch} split {splits}/{block_n}/{warps}w", seconds)
            print(f"    rel. error {error:.2e}, {read / seconds / 1e12:.2f} TB/s (eager call)")
        del keys, values
        torch.cuda.empty_cache()


def _decode_steps(out: _Results, model: Any, args: argparse.Namespace) -> None:
    """Whole decode steps (CUDA-graph replays) per attention and compile setting."""
    import torch

    from processors.internvl import StaticGreedyDecoder

    prompt = args.cache_length - 300
    for batch in (args.decode_batch, 2 * args.decode_batch):
        for split_attention, compiled, splits, block_n in (
            (False, False, 1, 0),
            (True, False, 1, 64),
            (True, True, 1, 64),
            (True, True, 1, 128),
            (True, True, 2, 0),
        ):
            decoder = StaticGreedyDecoder(
                model,
                cuda_graphs=True,
                split_attention=split_attention,
                attention_splits=splits,
                compile_step=compiled,
                **_DECODER_OPTIONS,
            )
            attention = decoder.split_key_attention
            if block_n and attention is not None:
                attention.block_n = block_n  # before the graph capture
            started = time.perf_counter()
            session = decoder.session(batch, prompt)
            print(f"  session B={batch} ready in {time.perf_counter() - started:.1f}s")
            for keys, values in zip(session.keys, session.values, strict=True):
                keys.normal_()
                values.normal_()
            session.prompt_length = prompt
            session.prompt_end.fill_(prompt)
            session.pads.copy_(torch.randint(0, 400, (batch,), device="cuda"))

            replay = functools.partial(replay_at, session, prompt + 150)

            name = (
                f"decode step B={batch} split={split_attention}/{splits}/{block_n or 'default'} "
                f"compiled={compiled}"
            )
            out.report(name, timed(replay, 20, 3))
            if decoder.compile_error:
                print(f"    compile error: {decoder.compile_error}")
            del decoder, session, replay
            gc.collect()
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """Profile the parts named by `--parts` on the GPU; with `--out`, write the timings."""
    args = _parse_args(argv)

    import torch

    parts = set(args.parts.split(","))
    out = _Results(torch.cuda.get_device_name())
    tokenizer = build_tokenizer(tokenizer_dir(args.tokenizer_dir))
    model = build_model(FULL, tokenizer, "cuda", torch.bfloat16, 0)
    torch.set_grad_enabled(False)
    if "gemm" in parts:
        _gemm(out, args)
    if "vision" in parts:
        _vision(out, model, args)  # its tensors are freed on return, before the next part
        _vision_attention(out, args)
    if "prefill" in parts:
        _prefill(out, model, args)
    if "decode" in parts:
        _decode_attention(out, args)
        _decode_steps(out, model, args)
    if args.out:
        Path(args.out).write_text(json.dumps(out.results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
