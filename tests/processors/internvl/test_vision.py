"""Image features: patch-as-matmul and the vendor-image feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from processors.inference import PreparedRequest
from processors.internvl import (
    FeatureCache,
    VisionEncoder,
    content_key,
    patch_projection_as_matmul,
)
from tests.processors.internvl.helpers import (
    MAX_NEW,
    generate_engine,
)
from tests.support.tiny_internvl import load_native


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
    engine = load_native(checkpoints["native"], max_new_tokens=MAX_NEW)
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
    engine = load_native(checkpoints["native"], max_new_tokens=MAX_NEW)
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


def test_staged_images_give_the_same_features_and_share_the_cache(
    checkpoints: dict[str, Path],
) -> None:
    vendor = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(5))
    requests = [
        PreparedRequest(
            f"r{index}",
            1,
            "<image> vs <image>?",
            (1, 2),
            torch.cat(
                [
                    vendor,
                    torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(index)),
                ]
            ),
        )
        for index in range(3)
    ]
    engine = load_native(checkpoints["native"], max_new_tokens=MAX_NEW)
    cache = engine.feature_cache
    assert cache is not None
    staged = [engine.stage_images(request) for request in requests]
    assert [len(item.images) for item in staged] == [2, 2, 2]
    assert [tuple(image.shape[0] for image in item.images) for item in staged] == [(1, 2)] * 3
    # Keys of the float32 tiles, as the unstaged path computes them; vendor images only.
    assert [item.keys for item in staged] == [(content_key(vendor),)] * 3
    with torch.inference_mode():
        expected = engine.image_features(requests)  # computes the vendor image once, keeps it
        assert (cache.hits, cache.misses, len(cache)) == (0, 3, 1)
        got = engine.image_features(requests, staged=staged)
    assert cache.hits == 3  # every staged vendor image came from the cache
    for features, reference in zip(got, expected, strict=True):
        for part, want in zip(features, reference, strict=True):
            torch.testing.assert_close(part, want, atol=0, rtol=0)
    cache.clear()
    with torch.inference_mode():
        fresh = engine.image_features(requests[1:], staged=staged[1:])  # computed, not cached
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 1)
    torch.testing.assert_close(fresh[0][1], expected[1][1], atol=0, rtol=0)
    assert engine.stage_images(PreparedRequest("t", 1, "text only", (), None)).images == ()
