"""Checkpoint folders that cannot be served fail at load with MODEL_NOT_LOADED."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.internvl import (
    EngineConfig,
    load_engine,
)
from tests.support.tiny_internvl import (
    original_config,
)


def test_missing_folder_is_model_not_loaded(tmp_path: Path) -> None:
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(tmp_path / "nowhere"))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "does not exist" in caught.value.message


def test_missing_weights_is_model_not_loaded(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("native", "original"):
        folder = tmp_path / kind
        shutil.copytree(checkpoints[kind], folder, ignore=shutil.ignore_patterns("*.safetensors"))
        with pytest.raises(ProcessingError) as caught:
            load_engine(EngineConfig(folder))
        assert caught.value.code == ErrorCode.MODEL_NOT_LOADED


def test_unsupported_checkpoints_are_model_not_loaded(tmp_path: Path) -> None:
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(other))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "unsupported checkpoint" in caught.value.message

    internlm = tmp_path / "internlm"
    internlm.mkdir()
    config = original_config(vocab_size=100, with_remote_code=False)
    config["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    (internlm / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(internlm))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "no modeling code" in caught.value.message
