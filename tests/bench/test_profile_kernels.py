"""The kernel profile's smoke shape runs on CPU and times every (splits, batch) it is asked."""

from __future__ import annotations

import json
from pathlib import Path

from bench.profile_kernels import main
from processors.internvl import MAX_SPLITS


def test_smoke_profile_times_each_count_of_splits_at_each_batch(tmp_path: Path) -> None:
    out = tmp_path / "kernels-smoke.json"
    argv = ["--smoke", "--batches", "2,4", "--splits", f"1,{MAX_SPLITS},0", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    # Uncompiled on the CPU: the engine's tower is the eager reference itself.
    assert result["vision"]["max_difference_from_eager"] == 0.0
    assert result["vision"]["reference_max"] > 0
    assert all(ms > 0 for ms in result["vision"]["ms"].values())
    timings = result["step_kernels"]["ms"]
    assert set(timings) == {"1", str(MAX_SPLITS), "0"}
    assert all(set(row) == {"2", "4"} and min(row.values()) > 0 for row in timings.values())
    assert result["attention"]["default_ms"] > 0
