"""The load benchmark's smoke shape runs on CPU and writes the result keys the issue names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.bench_load import main, make_plan, parse_args
from bench.load_workload import answer_lengths, arrival_times, slot_variants

ROW_KEYS = {"engine", "arrival_per_s", "achieved_per_s", "p50_s", "p95_s", "p99_s"}


def test_workload_is_seeded_and_clipped() -> None:
    lengths = answer_lengths(2000, 300, 0.5, 120, 900, seed=1)
    assert lengths == answer_lengths(2000, 300, 0.5, 120, 900, seed=1)
    assert min(lengths) >= 120 and max(lengths) <= 900
    assert 280 <= sorted(lengths)[1000] <= 320  # the median
    times = arrival_times(20.0, 50.0, seed=2)
    assert times == sorted(times) and times[-1] < 50.0
    assert 900 <= len(times) <= 1100  # Poisson: about rate x duration


def test_the_gpu_plan_takes_the_engines_slot_count_unless_told() -> None:
    from processors.slot_records import SlotEngineConfig

    assert make_plan(parse_args(["--device", "cpu"])).slots == SlotEngineConfig().max_slots
    assert make_plan(parse_args(["--device", "cpu", "--slots", "96"])).slots == 96
    assert make_plan(parse_args(["--smoke"])).slots == 8


def test_smoke_load_benchmark_writes_the_result(tmp_path: Path) -> None:
    out = tmp_path / "load-smoke.json"
    assert main(["--smoke", "--parity", "2", "--parity-tokens", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    for key in ("rates", "saturation_per_s", "device", "versions", "length_distribution"):
        assert key in result
    assert {row["engine"] for row in result["rates"]} == {"static", "slot"}
    for row in result["rates"]:
        assert set(row) == ROW_KEYS
        assert row["achieved_per_s"] > 0 and 0 < row["p50_s"] <= row["p95_s"] <= row["p99_s"]
    assert set(result["saturation_per_s"]) == {"static", "slot"}
    assert all(value > 0 for value in result["saturation_per_s"].values())
    assert all(row["identical"] for row in result["details"]["parity"]["rows"])
    slot_runs = [run for run in result["details"]["runs"] if run["engine"] == "slot"]
    assert slot_runs and all(run["steps"] > 0 for run in slot_runs)


def test_slot_variants_run_on_the_same_arrivals_beside_the_reported_engine(
    tmp_path: Path,
) -> None:
    assert slot_variants("") == [("default", {})]
    assert slot_variants(";steps_per_round=8;") == [
        ("default", {}),
        ("steps_per_round=8", {"steps_per_round": 8}),
    ]
    assert slot_variants("prefill_tokens_per_step=300,staged_requests=4;vision_requests=8") == [
        (
            "prefill_tokens_per_step=300,staged_requests=4",
            {"prefill_tokens_per_step": 300, "staged_requests": 4},
        ),
        ("vision_requests=8", {"vision_requests": 8}),
    ]
    with pytest.raises(SystemExit, match="prefill_tokens"):  # misspelt, before any model
        main(["--smoke", "--engines", "slot", "--slot-variants", "prefill_tokens=300"])
    out = tmp_path / "load-variants.json"
    variants = ";staged_requests=4,prefill_tokens_per_step=300"
    assert (
        main(["--smoke", "--engines", "slot", "--slot-variants", variants, "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text(encoding="utf-8"))
    reported = [row for row in result["rates"] if row["engine"] == "slot"]
    assert reported and set(result["saturation_per_s"]) == {"slot"}
    other = result["details"]["slot_variants"]["staged_requests=4,prefill_tokens_per_step=300"]
    assert [row["arrival_per_s"] for row in other["rows"]] == [r["arrival_per_s"] for r in reported]
    assert other["saturation_per_s"] > 0
    assert other["slot_engine"]["config"]["staged_requests"] == 4
    assert result["details"]["slot_engine"]["config"]["staged_requests"] != 4


def test_smoke_pipeline_run_downloads_tiles_and_answers_every_event(tmp_path: Path) -> None:
    out = tmp_path / "load-pipeline.json"
    argv = ["--smoke", "--engines", "none", "--pipeline-rate", "2", "--pipeline-free"]
    assert main([*argv, "--pipeline-slots", "4", "--out", str(out)]) == 0
    pipeline = json.loads(out.read_text(encoding="utf-8"))["details"]["pipeline"]
    # Every event has an outcome: the random model's free answers are invalid twice (1301).
    assert pipeline["events"] > 0 and pipeline["decisions"] == 0
    assert pipeline["failures_by_code"] == {"1301": pipeline["events"]}
    phases = pipeline["mean_phase_s_per_event"]
    assert phases["gather"] > 0 and phases["tile"] > 0 and phases["model"] > 0
    assert pipeline["decode_steps_per_event"] > 0  # both attempts went through the engine
    assert 0 < pipeline["p50_s"] <= pipeline["p95_s"] <= pipeline["p99_s"]
