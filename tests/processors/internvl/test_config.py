"""`EngineConfig` validation and the not-loaded engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.internvl import (
    EngineConfig,
    NativeInternVLEngine,
)
from tests.processors.internvl.helpers import (
    make_request,
)


def test_not_loaded_and_config_validation(tmp_path: Path) -> None:
    engine = NativeInternVLEngine(EngineConfig(tmp_path))
    assert engine.model_version.endswith(":not-loaded")
    with pytest.raises(ProcessingError) as caught:
        engine.generate([make_request("x", "<image>", (1,), seed=6)])
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    with pytest.raises(ValueError):
        EngineConfig(tmp_path, format="onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EngineConfig(tmp_path, max_batch_size=0)
    with pytest.raises(ValueError):
        EngineConfig(tmp_path, device="tpu")
    with pytest.raises(ValueError, match="decode_attention"):
        EngineConfig(tmp_path, decode_attention="flash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention_splits"):
        EngineConfig(tmp_path, attention_splits=-1)
