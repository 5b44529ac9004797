"""Engine choice at start-up: the replay engine only when asked for by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.inference import ReplayEngine
from streams.runtime import build_engine
from streams.settings import Settings, SettingsError


def recorded(tmp_path: Path) -> Path:
    path = tmp_path / "outputs.jsonl"
    path.write_text('{"uuid": "u-1", "model_outputs": ["{}"]}\n')
    return path


def test_no_model_and_no_engine_choice_refuses_naming_the_settings(tmp_path: Path) -> None:
    settings = Settings.from_env({"VS_REPLAY_OUTPUTS": str(recorded(tmp_path))})
    with pytest.raises(ProcessingError) as caught:
        build_engine(settings)
    assert caught.value.code is ErrorCode.MODEL_NOT_LOADED
    assert "VS_MODEL_PATH" in caught.value.message
    assert "VS_ENGINE=replay" in caught.value.message


def test_replay_when_asked_for(tmp_path: Path) -> None:
    env = {"VS_ENGINE": "replay", "VS_REPLAY_OUTPUTS": str(recorded(tmp_path))}
    engine = build_engine(Settings.from_env(env))
    assert isinstance(engine, ReplayEngine)


def test_replay_without_recordings_refuses(tmp_path: Path) -> None:
    env = {"VS_ENGINE": "replay", "VS_REPLAY_OUTPUTS": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ProcessingError, match="VS_REPLAY_OUTPUTS"):
        build_engine(Settings.from_env(env))


def test_an_unknown_engine_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="VS_ENGINE"):
        Settings.from_env({"VS_ENGINE": "gpt"})
