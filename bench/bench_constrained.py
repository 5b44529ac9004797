"""Free against constrained decoding, with and without forced runs, on the same requests.

    python bench/bench_constrained.py [--smoke] [--batch-size 64] [--saturation 256]
        [--requests N] [--tokenizer-dir PATH] [--forced-tokens 16] [--out PATH]

One model (`vlm_model.py`'s InternVL2.5-1B shape, random weights; `--smoke`: the tiny shape on
CPU), one set of requests (`vlm_model.make_requests`, each with its answer schema from
`processors.answer_schema`), all served by the slot engine (`processors.slot_engine`),
every request submitted at once, with `--batch-size` slots (where decode dominates) and
with `--saturation` slots. Three variants:

- `constrained_forced`: inside each request's grammar; the tokens the grammar forces
  after a row's chosen token are fed in the same step (`--forced-tokens` at most), by a
  second forward pass over the rows with a run, and the answer's forced opening is
  prefilled with the prompt;
- `constrained`: inside the grammar, one decode step per token, forced ones included;
- `free`: no grammar; each answer decodes exactly as many tokens as the constrained
  answers averaged (`min_new_tokens` = `max_new_tokens`), so the answers have the same
  length.

Reported per variant: verifications/s, decode steps per answer (steps each answer was a
row of), answer tokens, invalid answers (not parsed, or not valid against the request's
own schema for the constrained ones), and the CPU milliseconds per step spent filling
bitmasks (overlapping the GPU's forward pass). Writes `bench/results/constrained-h200.json`.
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
    """The benchmark's options (`--help` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU (CI)")
    parser.add_argument("--batch-size", type=int, default=0, help="default 64 (smoke 2)")
    parser.add_argument("--saturation", type=int, default=0, help="default 256 (smoke 4)")
    parser.add_argument("--requests", type=int, default=0, help="default 2 x saturation")
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--grammar-threads", type=int, default=8)
    parser.add_argument("--forced-tokens", type=int, default=16)
    parser.add_argument(
        "--follow-model", action="store_true", help="forced runs with SlotEngineConfig.follow_model"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="default bench/results/constrained-h200.json")
    return parser.parse_args(argv)


def _with_schemas(requests: list[Any], question_count: int, limits: Any) -> list[Any]:
    """The requests with the answer schema of the questions `make_requests` gave each."""
    from bench.vlm_model import questions_for
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


def _run(
    engine: Any,
    requests: list[Any],
    slots: int,
    forced_tokens: int,
    tokens: int | None,
    follow_model: bool = False,
) -> dict[str, Any]:
    """Serve `requests` on a slot engine of `slots` slots; throughput, steps and the ids."""
    from processors.slot_engine import SlotEngine, SlotEngineConfig

    prompt = max(len(engine.prompt_ids(request)) for request in requests)
    budget = engine.config.max_new_tokens
    slot = SlotEngine(
        engine,
        SlotEngineConfig(
            slots=slots,
            context_length=-(-(prompt + budget + 64) // 128) * 128,
            queue_size=len(requests) + 8,
            forced_tokens=forced_tokens,
            follow_model=follow_model,
        ),
    )
    slot.load()
    try:
        scheduler = slot.scheduler
        assert scheduler is not None
        # Warm-up: graphs of the batch sizes the run goes through, grammars compiled.
        warm = min(64, tokens or 64)
        for future in [slot.submit(r, max_new_tokens=warm) for r in requests[:slots]]:
            future.result()
        scheduler.stats = dict.fromkeys(scheduler.stats, 0)
        if scheduler.grammars is not None:
            scheduler.grammars.fill_s, scheduler.grammars.fill_steps = 0.0, 0
        started = time.perf_counter()
        futures = [slot.submit(r, max_new_tokens=tokens, min_new_tokens=tokens) for r in requests]
        ids = [list(future.result().token_ids) for future in futures]
        elapsed = time.perf_counter() - started
        grammars = scheduler.grammars
        mask_ms = None
        if grammars is not None and grammars.fill_steps:
            mask_ms = 1000.0 * grammars.fill_s / grammars.fill_steps
        return {
            "per_s": len(requests) / elapsed,
            "ids": ids,
            "steps_per_answer": scheduler.stats["active_rows"] / len(requests),
            "tokens_per_answer": sum(len(row) for row in ids) / len(ids),
            "forced_tokens_per_answer": scheduler.stats["forced_tokens"] / len(requests),
            "forced_taken_back_per_answer": scheduler.stats["forced_taken_back"] / len(requests),
            "mask_ms": mask_ms,
        }
    finally:
        slot.close()


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in run.items() if k != "ids"}


def main(argv: list[str] | None = None) -> int:
    """Run the three variants on the same requests; write the JSON result; 0 on success."""
    args = parse_args(argv)
    import torch

    from bench.vlm_model import (
        FULL,
        SMOKE,
        build_model,
        build_tokenizer,
        device_name,
        make_requests,
        tokenizer_dir,
        versions,
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

    def engine(**overrides: Any) -> NativeInternVLEngine:
        config = EngineConfig(
            f"{shape.name}-random",
            grammar_threads=args.grammar_threads,
            feature_cache_mb=0,
            **overrides,
        )
        return NativeInternVLEngine.from_model(config, model, tokenizer)

    budget = 2000 if args.smoke else 4000
    runs: dict[str, dict[str, Any]] = {}
    for size in (batch, saturation):
        for name, forced in (("constrained_forced", args.forced_tokens), ("constrained", 0)):
            run = _run(
                engine(max_new_tokens=budget),
                constrained_requests,
                size,
                forced,
                None,
                args.follow_model and forced > 0,
            )
            run["invalid"] = _invalid(run["ids"], constrained_requests, tokenizer, strict=True)
            runs[f"{name}_{size}"] = run
            print(f"[constrained] {name} {size}: {_brief(run)}", flush=True)
        length = max(1, round(runs[f"constrained_{size}"]["tokens_per_answer"]))
        free = engine(max_new_tokens=length, constrained_decoding=False)
        run = _run(free, plain, size, 0, length)
        run["invalid"] = _invalid(run["ids"], plain, tokenizer, strict=False)
        runs[f"free_{size}"] = run
        print(f"[constrained] free {size}: {_brief(run)}", flush=True)
    variants = ("free", "constrained", "constrained_forced")

    def figure(name: str, size: int, key: str = "per_s") -> float:
        return round(float(runs[f"{name}_{size}"][key]), 4)

    out = {
        "device": device_name(device),
        "shape": shape.name,
        "engine": "slot",
        "requests": count,
        "questions": stats["questions"],
        "batch_size": batch,
        "saturation_batch_size": saturation,
        "free_per_s": figure("free", batch),
        "constrained_per_s": figure("constrained", batch),
        "constrained_forced_per_s": figure("constrained_forced", batch),
        "forced_over_free": round(figure("constrained_forced", batch) / figure("free", batch), 4),
        "free_saturation_per_s": figure("free", saturation),
        "constrained_saturation_per_s": figure("constrained", saturation),
        "constrained_forced_saturation_per_s": figure("constrained_forced", saturation),
        "saturation_ratio": round(
            figure("constrained_forced", saturation) / figure("free", saturation), 4
        ),
        "decode_steps_per_answer": {v: figure(v, batch, "steps_per_answer") for v in variants},
        "tokens_per_answer": {v: figure(v, batch, "tokens_per_answer") for v in variants},
        "forced_tokens_per_answer": figure("constrained_forced", batch, "forced_tokens_per_answer"),
        "mask_ms_per_step": {
            v: runs[f"{v}_{batch}"]["mask_ms"] and round(runs[f"{v}_{batch}"]["mask_ms"], 4)
            for v in variants[1:]
        },
        "invalid_answers": {
            v: sum(int(runs[f"{v}_{size}"]["invalid"]) for size in (batch, saturation))
            for v in variants
        },
        "grammar_threads": args.grammar_threads,
        "forced_tokens": args.forced_tokens,
        "follow_model": args.follow_model,
        "versions": versions(),
    }
    path = Path(args.out) if args.out else RESULTS / "constrained-h200.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
