"""InternVL engines on tiny random checkpoints (CPU): native, converted original, remote code.

All three checkpoint layouts hold the same seeded weights (see
`tests.support.tiny_internvl`), so greedy token ids must agree across engines, and a
batched call must agree with one-at-a-time calls (left padding). Everything is read from
local folders (`local_files_only=True`); no test touches the network. Fixtures:
`conftest.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from processors.errors import ErrorCode, ProcessingError
from processors.inference import InferenceEngine, PreparedRequest
from processors.internvl import (
    EngineConfig,
    NativeInternVLEngine,
    RemoteCodeInternVLEngine,
    create_engine,
    load_engine,
)
from tests.processors.internvl.helpers import (
    MAX_NEW,
    load_checkpoint,
)


def test_factory_loads_native_checkpoint(native: InferenceEngine) -> None:
    assert isinstance(native, NativeInternVLEngine)
    assert isinstance(native, InferenceEngine)
    assert native.converted_from_original is False
    assert native.device == "cpu" and native.dtype == torch.float32
    assert native.attn_implementation == "sdpa"
    assert native.tokens_per_tile == 256  # (448 // 14)^2 * 0.5^2
    assert native.model_version.startswith("internvl-native:native:")
    assert native.model_version != "internvl-native:native:not-loaded"


def test_remote_code_engine_matches_native(
    checkpoints: dict[str, Path],
    native: NativeInternVLEngine,
    batch: list[PreparedRequest],
    batched_ids: list[list[int]],
) -> None:
    """The original-format forward (stand-in remote code) agrees with the converted native one."""
    config = EngineConfig(checkpoints["remote"], max_new_tokens=MAX_NEW, format="remote-code")
    engine = load_checkpoint(config)
    assert isinstance(engine, RemoteCodeInternVLEngine)
    assert engine.model_version.startswith("internvl-remote-code:remote:")
    assert engine.generate_token_ids(batch) == batched_ids
    assert engine.generate(batch[:1]) == native.generate(batch[:1])


def test_auto_prefers_native_conversion_for_original_with_code(
    checkpoints: dict[str, Path],
) -> None:
    """A convertible original checkpoint is served natively even when it carries code."""
    engine = create_engine(EngineConfig(checkpoints["remote"]))
    assert isinstance(engine, NativeInternVLEngine)
    assert not engine.loaded


def test_remote_code_format_needs_code(checkpoints: dict[str, Path]) -> None:
    for kind in ("native", "original"):
        with pytest.raises(ProcessingError) as caught:
            load_engine(EngineConfig(checkpoints[kind], format="remote-code"))
        assert caught.value.code == ErrorCode.MODEL_NOT_LOADED


def test_from_model_wraps_an_in_memory_model(
    native: NativeInternVLEngine, batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    wrapped = NativeInternVLEngine.from_model(
        EngineConfig("bench-model", max_new_tokens=MAX_NEW), native.model, native.tokenizer
    )
    assert wrapped.loaded and wrapped.model_version == "internvl-native:bench-model:in-memory"
    assert wrapped.generate_token_ids(batch) == batched_ids
