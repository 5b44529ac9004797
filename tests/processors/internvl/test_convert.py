"""Original -> native conversion (`processors.internvl.convert`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import (
    EngineConfig,
    NativeInternVLEngine,
    convert_original_state_dict,
)
from tests.processors.internvl.helpers import (
    MAX_NEW,
    load_checkpoint,
)


def test_unknown_original_weight_is_refused() -> None:
    tensor = torch.zeros(2)
    assert set(convert_original_state_dict({"mlp1.1.bias": tensor})) == {
        "model.multi_modal_projector.linear_1.bias"
    }
    with pytest.raises(ProcessingError) as caught:
        convert_original_state_dict({"language_model.base_model.lora_A.weight": tensor})
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED


def test_qkv_is_split_in_row_order() -> None:
    qkv = torch.arange(12.0).reshape(6, 2)
    out = convert_original_state_dict({"vision_model.encoder.layers.3.attn.qkv.weight": qkv})
    prefix = "model.vision_tower.encoder.layer.3.attention."
    assert torch.equal(out[prefix + "q_proj.weight"], qkv[0:2])
    assert torch.equal(out[prefix + "k_proj.weight"], qkv[2:4])
    assert torch.equal(out[prefix + "v_proj.weight"], qkv[4:6])


def test_converted_original_checkpoint_matches_native(
    checkpoints: dict[str, Path], batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    engine = load_checkpoint(EngineConfig(checkpoints["original"], max_new_tokens=MAX_NEW))
    assert isinstance(engine, NativeInternVLEngine)
    assert engine.converted_from_original is True
    assert engine.generate_token_ids(batch) == batched_ids
