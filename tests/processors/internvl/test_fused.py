"""Fused query/key/value and gate/up projections (`processors.internvl.fused`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from processors.inference import PreparedRequest
from processors.internvl import (
    EngineConfig,
    NativeInternVLEngine,
    fuse_layer,
    fused_of,
    load_engine,
    mlp_output,
    project_fused,
    unfuse_layer,
)
from tests.processors.internvl.helpers import generate_engine
from tests.support.tiny_internvl import build_tokenizer, load_native, tiny_native_model


@pytest.fixture
def layer() -> Any:
    model = tiny_native_model(build_tokenizer())
    return model.model.language_model.layers[0]


def test_fused_products_equal_the_modules_and_share_their_memory(layer: Any) -> None:
    attention, mlp = layer.self_attn, layer.mlp
    hidden = torch.randn(
        2, 5, attention.q_proj.in_features, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        separate = [attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden)]
        mlp_before = mlp(hidden)
        keys_before = sorted(layer.state_dict())
        fuse_layer(layer)
        fused = fused_of(attention)
        assert fused is not None and fused_of(mlp) is not None
        for got, want in zip(project_fused(fused, hidden), separate, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mlp_output(mlp, hidden), mlp_before, rtol=1e-6, atol=1e-6)
    # The modules' weights are views of the fused ones (no second copy) and still work.
    assert attention.k_proj.weight.data_ptr() == fused.weight[fused.widths[0] :].data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == (
        fused_of(mlp).weight.untyped_storage().data_ptr()  # type: ignore[union-attr]
    )
    assert sorted(layer.state_dict()) == keys_before  # nothing new to save
    with torch.no_grad():
        torch.testing.assert_close(mlp(hidden), mlp_before, rtol=1e-6, atol=1e-6)
    fuse_layer(layer)  # once only: a second call keeps the same tensors
    assert fused_of(attention) is fused
    unfuse_layer(layer)
    assert fused_of(attention) is None and fused_of(mlp) is None
    with torch.no_grad():  # the views left behind still compute the same
        torch.testing.assert_close(mlp_output(mlp, hidden), mlp_before, rtol=1e-6, atol=1e-6)


def test_mlp_output_without_fusion_is_the_module(layer: Any) -> None:
    hidden = torch.randn(1, 3, layer.mlp.gate_proj.in_features)
    with torch.no_grad():
        torch.testing.assert_close(mlp_output(layer.mlp, hidden), layer.mlp(hidden))


def test_mixed_biases_are_refused() -> None:
    parts = [torch.nn.Linear(4, 2, bias=True), torch.nn.Linear(4, 2, bias=False)]
    holder = torch.nn.Module()
    holder.q_proj, holder.k_proj, holder.v_proj = parts[0], parts[1], torch.nn.Linear(4, 2)
    layer = torch.nn.Module()
    layer.self_attn, layer.mlp = holder, torch.nn.Module()
    with pytest.raises(ValueError, match="bias"):
        fuse_layer(layer)


def test_static_path_with_fused_projections_matches_generate(
    checkpoints: dict[str, Path], batch: list[PreparedRequest]
) -> None:
    reference = generate_engine(checkpoints["native"], max_batch_size=1, max_new_tokens=12)
    expected = [reference.generate_token_ids([request])[0] for request in batch]
    fused = load_native(checkpoints["native"], max_new_tokens=12)  # the default
    assert fused.decoder is not None
    assert fused_of(fused.decoder.layers[0].self_attn) is not None
    assert fused.generate_token_ids(batch) == expected
    separate = load_engine(
        EngineConfig(checkpoints["native"], max_new_tokens=12, fuse_projections=False)
    )
    assert isinstance(separate, NativeInternVLEngine) and separate.decoder is not None
    assert fused_of(separate.decoder.layers[0].self_attn) is None
    assert separate.generate_token_ids(batch) == expected
