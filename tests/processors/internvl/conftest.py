"""Fixtures of the InternVL tests: the tiny checkpoints and one loaded native engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.inference import PreparedRequest
from processors.internvl import NativeInternVLEngine
from tests.processors.internvl.helpers import MAX_NEW, make_request
from tests.support.tiny_internvl import (
    build_tiny_internvl,
    build_tiny_original_internvl,
    load_native,
)


@pytest.fixture(scope="package")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("internvl")
    return {
        "native": build_tiny_internvl(root / "native"),
        "original": build_tiny_original_internvl(root / "original"),
        "remote": build_tiny_original_internvl(root / "remote", with_remote_code=True),
    }


@pytest.fixture(scope="package")
def native(checkpoints: dict[str, Path]) -> NativeInternVLEngine:
    return load_native(checkpoints["native"], max_new_tokens=MAX_NEW)


@pytest.fixture(scope="package")
def batch() -> list[PreparedRequest]:
    """Three requests of different prompt lengths and tile counts (so rows get padded)."""
    return [
        make_request("short", "<image>\nDescribe the product.", (1,), seed=1),
        make_request(
            "long",
            "Vendor image: <image>\nPickup images: <image>\n"
            "Compare the pickup with the vendor listing and answer in JSON with the fields "
            "image_analysis, verification_results and pickup_confidence.",
            (1, 2),
            seed=2,
        ),
        make_request("three", "<image><image><image> Same item?", (1, 1, 1), seed=3),
    ]


@pytest.fixture(scope="package")
def batched_ids(native: NativeInternVLEngine, batch: list[PreparedRequest]) -> list[list[int]]:
    return native.generate_token_ids(batch)
