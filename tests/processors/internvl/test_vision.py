"""Image features: patch-as-matmul and the vendor-image feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from processors.inference import PreparedRequest
from processors.internvl import (
    EngineConfig,
    FeatureCache,
    NativeInternVLEngine,
    VisionEncoder,
    content_key,
    load_engine,
    patch_projection_as_matmul,
)
from tests.processors.internvl.helpers import (
    MAX_NEW,
    generate_engine,
)


def test_patch_projection_as_matmul_equals_the_convolution() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)
    pixels = torch.randn(2, 3, 56, 42)
    expected = conv(pixels)
    assert patch_projection_as_matmul(conv)
    out = conv(pixels)
    assert out.shape == expected.shape == (2, 8, 4, 3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert set(conv.state_dict()) == {"weight", "bias"}  # checkpoints still load
    overlapping = torch.nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1)
    assert not patch_projection_as_matmul(overlapping)
    assert "forward" not in vars(overlapping)


def test_feature_cache_reuses_vendor_features(checkpoints: dict[str, Path]) -> None:
    vendor = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(5))
    requests = []
    for index in range(3):
        pickup = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(10 + index))
        requests.append(
            PreparedRequest(
                f"r{index}", 1, "<image> vs <image>?", (1, 2), torch.cat([vendor, pickup])
            )
        )
    reference = generate_engine(checkpoints["native"], max_new_tokens=MAX_NEW)
    expected = [reference.generate_token_ids([request])[0] for request in requests]
    engine = load_engine(EngineConfig(checkpoints["native"], max_new_tokens=MAX_NEW))
    assert isinstance(engine, NativeInternVLEngine)
    cache = engine.feature_cache
    assert cache is not None
    assert engine.generate_token_ids(requests[:1]) == expected[:1]
    assert len(cache) == 1 and cache.hits == 0
    assert engine.generate_token_ids(requests) == expected
    assert cache.hits == 3 and len(cache) == 1  # only the first image is a candidate


def test_feature_cache_is_memory_bounded() -> None:
    cache = FeatureCache(max_bytes=3 * 4 * 10)
    for index in range(5):
        cache.put(f"k{index}", torch.zeros(10))
    assert len(cache) == 3 and cache.bytes == 120
    assert cache.get("k0") is None and cache.get("k4") is not None
    same = content_key(torch.ones(1, 3, 4, 4))
    assert same == content_key(torch.ones(1, 3, 4, 4))
    assert same != content_key(torch.ones(1, 3, 4, 4) * 2)


def test_warm_up_runs_the_tower_on_one_and_two_tiles_and_caches_nothing(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = load_engine(EngineConfig(checkpoints["native"], max_new_tokens=MAX_NEW))
    assert isinstance(engine, NativeInternVLEngine)
    cache = FeatureCache(2**20)
    encoder = VisionEncoder(
        engine.model, device="cpu", dtype=torch.float32, batch_tiles=8, cache=cache, cache_images=1
    )
    inner = engine.model.model
    calls: list[int] = []
    original = inner.get_image_features

    def recording(**kwargs: object) -> object:
        pixels = kwargs["pixel_values"]
        assert isinstance(pixels, torch.Tensor)
        calls.append(int(pixels.shape[0]))
        return original(**kwargs)

    monkeypatch.setattr(inner, "get_image_features", recording)
    timings = {"transfer": 0.0}
    encoder.warm_up(engine.image_size, timings)
    assert calls == [1, 2]
    assert len(cache) == 0 and cache.misses == 0
    assert timings["transfer"] > 0
