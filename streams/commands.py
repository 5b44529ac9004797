"""CLI commands registered on the Faust app: `python -m streams <command> --help`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import faust
from faust.cli import AppCommand, argument, option

from streams.settings import Settings


def register_commands(app: faust.App, settings: Settings) -> None:
    """Attach every command; each imports its heavy modules only when it runs."""
    _register_training_commands(app, settings)
    _register_analytics_commands(app, settings)
    _register_model_commands(app, settings)


def _register_training_commands(app: faust.App, settings: Settings) -> None:
    """`replay`, `train-categorizer` and `convert-fashion-mnist`."""

    @app.command(
        option("--input", "input_path", required=True, help="JSON lines: request + model_outputs"),
        option(
            "--output", "output_path", required=True, help="where the decisions go (JSON lines)"
        ),
    )
    async def replay(self: AppCommand, input_path: str, output_path: str) -> None:
        """Re-decide recorded requests from their raw model outputs (no Kafka, GPU or network)."""
        from processors.replay import replay_jsonl

        summary = await _in_thread(replay_jsonl, Path(input_path), Path(output_path))
        self.say(f"replayed {summary}")

    @app.command(
        option("--data", required=True, help="training CSV: title, description, image, category"),
        option("--out", required=True, help="artifact folder to write"),
        option("--test-data", default=None, help="optional test CSV (else a held-out split)"),
        option("--image-encoder", default=None, help="efficientnet-lite0 (default) or resnet50"),
    )
    async def train_categorizer(
        self: AppCommand,
        data: str,
        out: str,
        test_data: str | None,
        image_encoder: str | None,
    ) -> None:
        """Train the categorizer (scaler, classifier, labels, TF-IDF) and evaluate it."""
        from streams.training import train

        report = await _in_thread(
            train,
            settings,
            Path(data),
            Path(out),
            test_csv=Path(test_data) if test_data else None,
            image_encoder=image_encoder or settings.image_encoder,
        )
        self.say(json.dumps(report, indent=2, default=str))

    @app.command(
        option("--out", required=True, help="folder for PNGs and CSV"),
        option("--split", default="train", help="train or test"),
        option("--limit", type=int, default=None, help="at most this many images"),
        option(
            "--text-mode",
            default="empty",
            help="empty, template (label-free) or catalog (names the class: demos only)",
        ),
        option("--source", default="/usr/share/datasets/fashion-mnist", help="dataset folder"),
    )
    async def convert_fashion_mnist(
        self: AppCommand, out: str, split: str, limit: int | None, text_mode: str, source: str
    ) -> None:
        """Convert Debian's Fashion-MNIST into the training layout."""
        from processors.categorization import convert_fashion_mnist as convert

        path = await _in_thread(
            convert, Path(source), Path(out), split=split, limit=limit, text_mode=text_mode
        )
        self.say(f"wrote {path}")


def _register_analytics_commands(app: faust.App, settings: Settings) -> None:
    """`query` and `report` over the analytics database."""

    @app.command(
        argument("sql"),
        option("--json", "as_json", is_flag=True, default=False, help="print JSON"),
    )
    async def query(self: AppCommand, sql: str, as_json: bool) -> None:
        """Run one read-only SQL statement against the analytics database."""
        from processors.analytics.client import open_client
        from processors.analytics.reports import format_table, run_query, to_json

        client = open_client(settings.effective_clickhouse_dsn)
        result = await _in_thread(run_query, client, sql)
        self.say(to_json(result) if as_json else format_table(result))

    @app.command(
        argument("name", required=False),
        option("--since", default="7d", help="window, e.g. 1d, 12h, 30m"),
        option("--json", "as_json", is_flag=True, default=False, help="print JSON"),
    )
    async def report(self: AppCommand, name: str | None, since: str, as_json: bool) -> None:
        """Named outcome reports; without a name, every report."""
        from processors.analytics.client import open_client
        from processors.analytics.reports import (
            format_table,
            list_reports,
            parse_since,
            run_report,
            to_json,
        )

        names = [name] if name else list_reports()
        client = open_client(settings.effective_clickhouse_dsn)
        window = parse_since(since)
        for report_name in names:
            result = await _in_thread(run_report, client, report_name, window)
            if as_json:
                self.say(json.dumps({"report": report_name, **json.loads(to_json(result))}))
            else:
                self.say(f"\n== {report_name} (since {since})\n{format_table(result)}")


def _register_model_commands(app: faust.App, settings: Settings) -> None:
    """`bench-vlm`, `check-model` and `demo`."""

    @app.command(argument("args", nargs=-1))
    async def bench_vlm(self: AppCommand, args: tuple[str, ...]) -> None:
        """GPU throughput benchmark (bench/bench_vlm.py); `bench-vlm -- --help` lists options."""
        from bench.bench_vlm import main as bench_main

        code = await _in_thread(bench_main, list(args))
        if code:
            sys.exit(code)

    @app.command(
        option("--model-path", required=True, help="the checkpoint folder to check"),
        option("--requests", type=int, default=3, help="sample verification requests to run"),
        option("--device", default="auto", help="auto, cpu, cuda or cuda:N"),
        option("--json", "json_path", default=None, help="also write the report here as JSON"),
        option("--max-new-tokens", type=int, default=256, help="greedy budget per request"),
        option("--no-bf16", is_flag=True, default=False, help="skip the bfloat16 run"),
        option("--samples", default=None, help="sample requests (JSON lines; default: shipped)"),
    )
    async def check_model(
        self: AppCommand,
        model_path: str,
        requests: int,
        device: str,
        json_path: str | None,
        max_new_tokens: int,
        no_bf16: bool,
        samples: str | None,
    ) -> None:
        """Pre-flight: does the fast engine answer exactly as the checkpoint's own code?

        Exits 1 when a float32 prompt or greedy sequence differs, 2 when the checkpoint
        cannot be loaded (the same refusal a worker gives at start).
        """
        from processors.errors import ProcessingError
        from processors.model_check import check_model as run_check
        from processors.model_check import load_samples
        from processors.model_check_report import format_report

        chosen = load_samples(Path(samples) if samples else SAMPLE_REQUESTS, requests)
        try:
            report = await _in_thread(
                run_check,
                Path(model_path),
                chosen,
                device=device,
                max_new_tokens=max_new_tokens,
                bf16=not no_bf16,
                progress=_progress,
            )
        except ProcessingError as exc:
            self.say(f"check-model: {exc.code.name}: {exc.message}")
            sys.exit(2)
        self.say(format_report(report))
        if json_path:
            Path(json_path).write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
        if not report.passed:
            sys.exit(1)

    @app.command(
        option("--timeout", type=float, default=180.0, help="seconds to wait for the outputs"),
        option("--keep-running", is_flag=True, default=False, help="leave the workers running"),
    )
    async def demo(self: AppCommand, timeout: float, keep_running: bool) -> None:
        """Start the local broker and both workers, feed the samples, print the outputs."""
        from streams.demo import run_demo

        code = await _in_thread(run_demo, settings, timeout=timeout, keep_running=keep_running)
        if code:
            sys.exit(code)


SAMPLE_REQUESTS = Path(__file__).parent / "samples" / "check_model.jsonl"
"""The sample verification requests `check-model` runs (images from the categorization set)."""


def _progress(items: Any, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="request", leave=False)


async def _in_thread(func: Any, *args: Any, **kwargs: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(func, *args, **kwargs)
