"""Settings from the environment, and the engine configuration built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.runtime import engine_config
from streams.settings import Settings, SettingsError


def test_model_compile_turns_on_every_compile_option() -> None:
    default = engine_config(Settings.from_env({}), Path("/models/internvl"))
    assert not (default.compile_vision or default.compile_prefill or default.compile_decode)
    settings = Settings.from_env(
        {"VS_MODEL_COMPILE": "true", "VS_MODEL_MAX_BATCH": "512", "VS_MAX_NEW_TOKENS": "300"}
    )
    config = engine_config(settings, Path("/models/internvl"))
    assert config.compile_vision and config.compile_prefill and config.compile_decode
    assert (config.max_batch_size, config.max_new_tokens) == (512, 300)
    assert config.decode_attention == "auto"


def test_unreadable_flag_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="VS_MODEL_COMPILE"):
        Settings.from_env({"VS_MODEL_COMPILE": "sometimes"})
