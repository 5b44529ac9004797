"""The constrained-decoding benchmark's smoke shape runs on CPU and writes its keys."""

from __future__ import annotations

import json
from pathlib import Path

from bench.bench_constrained import main


def test_smoke_benchmark_writes_the_result(tmp_path: Path) -> None:
    out = tmp_path / "constrained-smoke.json"
    assert main(["--smoke", "--requests", "4", "--grammar-threads", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    for key in (
        "device",
        "batch_size",
        "free_per_s",
        "constrained_per_s",
        "constrained_forced_per_s",
        "saturation_ratio",
        "decode_steps_per_answer",
        "mask_ms_per_step",
        "invalid_answers",
    ):
        assert key in result
    assert result["batch_size"] == 2
    assert result["engine"] == "slot"
    assert result["free_per_s"] > 0 and result["constrained_per_s"] > 0
    assert result["constrained_forced_per_s"] > 0 and result["saturation_ratio"] > 0
    invalid = result["invalid_answers"]
    assert invalid["constrained"] == invalid["constrained_forced"] == 0  # all valid
    assert invalid["free"] > 0  # a random model's free answers are not
    steps, tokens = result["decode_steps_per_answer"], result["tokens_per_answer"]
    assert tokens["free"] == round(tokens["constrained"]) > 10  # the same answer length
    # Forced runs take no step per forced token.
    assert steps["constrained_forced"] < steps["constrained"]
    assert result["forced_tokens_per_answer"] > 0
    assert result["mask_ms_per_step"]["constrained"] > 0
