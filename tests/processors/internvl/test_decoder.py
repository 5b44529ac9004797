"""The static fast decode path (`processors.internvl.decoder`) against `generate`."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import (
    EngineConfig,
    NativeInternVLEngine,
    load_engine,
)
from tests.processors.internvl.helpers import (
    generate_engine,
    make_request,
)
from tests.support.tiny_internvl import load_native


def test_split_attention_needs_cuda(checkpoints: dict[str, Path]) -> None:
    """Asked for explicitly on a CPU, the split-key kernel is a start-up error; auto is SDPA."""
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(checkpoints["native"], decode_attention="split"))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "CUDA" in caught.value.message
    engine = load_native(checkpoints["native"])
    assert engine.decoder is not None
    assert not engine.decoder.split_attention


def test_static_path_is_the_default(native: NativeInternVLEngine) -> None:
    assert native.decoder is not None
    assert native.feature_cache is not None
    native.generate_token_ids([make_request("t", "<image> hi", (1,), seed=9)])
    assert native.timings["decode"] > 0 and native.timings["prefill"] > 0


@pytest.mark.parametrize(("min_new", "max_batch"), [(0, 32), (12, 32), (0, 1)])
def test_static_decode_matches_generate(
    checkpoints: dict[str, Path], batch: list[PreparedRequest], min_new: int, max_batch: int
) -> None:
    """Greedy ids of the static path equal `generate`, batched or one at a time."""
    common = {"max_new_tokens": 12, "min_new_tokens": min_new}
    reference = generate_engine(checkpoints["native"], max_batch_size=1, **common)
    expected = [reference.generate_token_ids([request])[0] for request in batch]
    fast = load_engine(
        EngineConfig(
            checkpoints["native"],
            max_batch_size=max_batch,  # 1: three chunks, pipelined
            prefill_batch_size=2,  # two prefill sub-batches in one decode session
            vision_batch_tiles=2,
            cache_length_bucket=64,
            **common,  # type: ignore[arg-type]
        )
    )
    assert isinstance(fast, NativeInternVLEngine) and fast.decoder is not None
    assert fast.generate_token_ids(batch) == expected
    assert [fast.generate_token_ids([request])[0] for request in batch] == expected
    if min_new:
        assert all(len(ids) == 12 for ids in expected)
