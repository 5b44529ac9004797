"""The split-key decode attention kernel: its limits here, its arithmetic under Triton's interpreter.

The kernel's numerical checks live in `interpreted_decode_attention.py`, run in a child
pytest with `TRITON_INTERPRET=1` (the interpreter must be on before Triton is imported,
which this process has already done). The GPU run of the same kernel is measured by
`bench/profile_parts.py` (relative error against SDPA in bf16, and timings).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from processors.internvl import MAX_SPLITS, SplitKeyAttention, auto_splits

ROOT = Path(__file__).resolve().parents[3]


def test_kernel_matches_dense_attention_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    checks = Path(__file__).with_name("interpreted_decode_attention.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary


def test_unsupported_shapes_and_options_are_refused() -> None:
    assert SplitKeyAttention.supports(64, 7)
    assert not SplitKeyAttention.supports(80, 7)  # not a power of two
    assert not SplitKeyAttention.supports(64, 17)  # more query heads per group than a tile
    with pytest.raises(ValueError, match="splits"):
        SplitKeyAttention(splits=-1)
    with pytest.raises(ValueError, match="block_n"):
        SplitKeyAttention(block_n=24)


def test_auto_splits_fill_the_gpu_only_where_the_rows_do_not() -> None:
    # An H200 has 132 multiprocessors; Qwen2-0.5B has 2 key/value heads per row.
    assert auto_splits(16 * 2, 132) == 8  # 264 // 32
    assert auto_splits(32 * 2, 132) == 4
    assert auto_splits(64 * 2, 132) == 2
    assert auto_splits(128 * 2, 132) == 1  # enough programs: no merge pass
    assert auto_splits(256 * 2, 132) == 1
    assert auto_splits(2, 132) == MAX_SPLITS  # capped
    assert auto_splits(0, 132) == MAX_SPLITS
