"""The VLM benchmark's smoke shape runs on CPU and writes the result keys (so it cannot rot)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.bench_vlm import main


def test_smoke_benchmark_writes_the_result(tmp_path: Path) -> None:
    out = tmp_path / "vlm-smoke.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    for key in ("device", "versions", "shape", "speedup", "p50_latency_s", "p95_latency_s"):
        assert key in result
    shape = result["shape"]
    assert shape["tiles"] == 7  # 1 vendor tile + 2 pickup photos x (2 tiles + thumbnail)
    assert shape["prompt_tokens"] > shape["image_tokens"] == 7 * 256
    assert shape["generated_tokens"] == 4
    assert result["seed_path"]["verifications_per_s"] > 0
    assert result["batched"]["verifications_per_s"] > 0
    assert result["batched"]["batch_size"] == 2
    assert result["batched"]["generated_tokens"] == [4, 4, 4, 4]
    assert all(match["identical"] for match in result["token_ids_seed_vs_batched"])
