"""Free against constrained decoding on the same requests and answer length (issue 15).

    python bench/bench_constrained.py [--smoke] [--batch-size 64] [--saturation 256]
        [--requests N] [--tokenizer-dir PATH] [--out PATH]

One model (bench_vlm's InternVL2.5-1B shape, random weights; `--smoke`: the tiny shape on
CPU), one set of requests (`bench_vlm.make_requests`, each with its answer schema from
`processors.answer_schema`). The constrained variant runs first; the free variant then
decodes exactly as many tokens per answer as the constrained answers averaged
(`min_new_tokens` = `max_new_tokens`), so both variants write answers of the same
length. Each variant runs at `--batch-size` (where decode dominates) and at
`--saturation`. Reported per variant: verifications/s, decode steps per answer, invalid
answers (not parsed, or not valid against the request's own schema for the constrained
one), and for the constrained one the CPU milliseconds per step spent filling bitmasks.

The forced-runs variant (forced tokens written in one multi-token forward) is not built
yet: its keys are written as null, and `saturation_ratio` (forced over free) with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/bench_constrained.py` from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU (CI)")
    parser.add_argument("--batch-size", type=int, default=0, help="default 64 (smoke 2)")
    parser.add_argument("--saturation", type=int, default=0, help="default 256 (smoke 4)")
    parser.add_argument("--requests", type=int, default=0, help="default 2 x saturation")
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--grammar-threads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="default bench/results/constrained-h200.json")
    return parser.parse_args(argv)


def _with_schemas(requests: list[Any], question_count: int, limits: Any) -> list[Any]:
    """The requests with the answer schema of the questions `make_requests` gave each."""
    from bench.bench_vlm import questions_for
    from processors.answer_schema import answer_schema
    from processors.prompt import parse_questions

    out = []
    for index, request in enumerate(requests):
        questions = questions_for(index, max(1, question_count + index % 3 - 1))
        schema = answer_schema(parse_questions(json.dumps(questions)), limits)
        out.append(dataclasses.replace(request, answer_schema=schema))
    return out


def _invalid(ids: list[list[int]], requests: list[Any], tokenizer: Any, strict: bool) -> int:
    from jsonschema import Draft202012Validator

    from processors.answer_parsing import parse_answer

    bad = 0
    for row, request in zip(ids, requests, strict=True):
        parsed = parse_answer(tokenizer.decode(row, skip_special_tokens=True))
        valid = parsed.answer is not None and (
            not strict
            or Draft202012Validator(request.answer_schema.json_schema).is_valid(parsed.answer)
        )
        bad += 0 if valid else 1
    return bad


def _run(engine: Any, requests: list[Any], batch: int) -> tuple[float, list[list[int]]]:
    engine.generate_token_ids(requests[:batch])  # warm-up: graphs, grammars
    started = time.perf_counter()
    ids: list[list[int]] = []
    for begin in range(0, len(requests), batch):
        ids.extend(engine.generate_token_ids(requests[begin : begin + batch]))
    return len(requests) / (time.perf_counter() - started), ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.bench_vlm import (
        FULL,
        SMOKE,
        build_model,
        build_tokenizer,
        device_name,
        make_requests,
        tokenizer_dir,
    )
    from processors.answer_schema import FieldLimits
    from processors.internvl import EngineConfig, NativeInternVLEngine

    shape = SMOKE if args.smoke else FULL
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    batch = args.batch_size or (2 if args.smoke else 64)
    saturation = args.saturation or (4 if args.smoke else 256)
    count = args.requests or 2 * saturation
    # The smoke shape's random answers fill every free string: short bounds keep it quick.
    limits = FieldLimits(analysis=8, evidence=8, text_result=4) if args.smoke else FieldLimits()
    tokenizer = build_tokenizer(tokenizer_dir(args.tokenizer_dir))
    model = build_model(shape, tokenizer, device, dtype, args.seed)
    plain, stats = make_requests(shape, tokenizer, count, 0, args.seed, shape.text_tokens)
    constrained_requests = _with_schemas(plain, int(stats["questions"]), limits)

    def engine(size: int, **overrides: Any) -> NativeInternVLEngine:
        config = EngineConfig(
            f"{shape.name}-random",
            max_batch_size=size,
            grammar_threads=args.grammar_threads,
            **overrides,
        )
        return NativeInternVLEngine.from_model(config, model, tokenizer)

    budget = 4000
    results: dict[str, Any] = {}
    steps: dict[str, Any] = {}
    invalid: dict[str, Any] = {}
    mask_ms: float | None = None
    for size in (batch, saturation):
        fast = engine(size, max_new_tokens=budget)
        per_s, ids = _run(fast, constrained_requests, size)
        grammars = fast.grammars
        if size == batch and grammars is not None and grammars.fill_steps:
            mask_ms = 1000.0 * grammars.fill_s / grammars.fill_steps
        length = max(1, round(sum(len(r) for r in ids) / len(ids)))
        results[f"constrained_{size}"] = per_s
        steps.setdefault("constrained", length)
        invalid["constrained"] = invalid.get("constrained", 0) + _invalid(
            ids, constrained_requests, tokenizer, strict=True
        )
        free = engine(
            size, max_new_tokens=length, min_new_tokens=length, constrained_decoding=False
        )
        per_s, ids = _run(free, plain, size)
        results[f"free_{size}"] = per_s
        steps.setdefault("free", length)
        invalid["free"] = invalid.get("free", 0) + _invalid(ids, plain, tokenizer, strict=False)
    steps["constrained_forced"] = None
    invalid["constrained_forced"] = None
    out = {
        "device": device_name(device),
        "shape": shape.name,
        "requests": count,
        "questions": stats["questions"],
        "batch_size": batch,
        "saturation_batch_size": saturation,
        "free_per_s": round(results[f"free_{batch}"], 4),
        "constrained_per_s": round(results[f"constrained_{batch}"], 4),
        "constrained_forced_per_s": None,
        "free_saturation_per_s": round(results[f"free_{saturation}"], 4),
        "constrained_saturation_per_s": round(results[f"constrained_{saturation}"], 4),
        "saturation_ratio": None,
        "decode_steps_per_answer": steps,
        "mask_ms_per_step": None if mask_ms is None else round(mask_ms, 4),
        "invalid_answers": invalid,
        "grammar_threads": args.grammar_threads,
        "not_built": "forced runs (constrained_forced_*, saturation_ratio)",
    }
    path = Path(args.out) if args.out else RESULTS / "constrained-h200.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
