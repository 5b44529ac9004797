"""Shared helpers of the InternVL tests (engines on the tiny checkpoints, requests)."""

from __future__ import annotations

from pathlib import Path

import torch

from processors.inference import PreparedRequest
from processors.internvl import (
    EngineConfig,
    NativeInternVLEngine,
    RemoteCodeInternVLEngine,
    create_engine,
)
from tests.support.tiny_internvl import load_native

MAX_NEW = 8


def load_checkpoint(config: EngineConfig) -> NativeInternVLEngine | RemoteCodeInternVLEngine:
    engine = create_engine(config)
    engine.load()
    return engine


def make_request(name: str, prompt: str, patches: tuple[int, ...], seed: int) -> PreparedRequest:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(patches), 3, 448, 448, generator=generator) if patches else None
    return PreparedRequest(name, 1, prompt, patches, pixels)


def generate_engine(path: Path, **overrides: object) -> NativeInternVLEngine:
    return load_native(path, decode="generate", **overrides)
