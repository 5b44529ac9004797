"""The original remote code loads on transformers 5 without its files being edited.

The tiny remote-code checkpoint's stand-in behaves like OpenGVLab's files in the two
respects that break on transformers 5 (see `tests.support.tiny_internvl`); these tests
check that it does, and that `processors.remote_code` copes with both.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from transformers import PretrainedConfig

from processors.internvl import EngineConfig, RemoteCodeInternVLEngine, create_engine
from processors.remote_code import (
    allow_construction_without_defaults,
    load_remote_config,
    remote_config_class,
)
from tests.support.tiny_internvl import build_tiny_original_internvl


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_original_internvl(
        tmp_path_factory.mktemp("remote-code") / "remote", with_remote_code=True
    )


def _raw(folder: Path) -> dict[str, object]:
    raw: dict[str, object] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return raw


def _digests(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


def test_the_stand_in_config_rejects_construction_without_arguments(remote: Path) -> None:
    config_class = remote_config_class(remote, _raw(remote))
    with pytest.raises(ValueError, match="Unsupported architecture"):
        config_class()


def test_the_stand_in_asks_for_flash_attention_like_a_released_config(remote: Path) -> None:
    llm = _raw(remote)["llm_config"]
    assert isinstance(llm, dict) and llm["attn_implementation"] == "flash_attention_2"


def test_construction_without_defaults_is_allowed_only_where_needed(remote: Path) -> None:
    class Buildable(PretrainedConfig):
        model_type = "buildable"

    assert allow_construction_without_defaults(Buildable) is False
    assert Buildable.has_no_defaults_at_init is False
    config_class = remote_config_class(remote, _raw(remote))
    allow_construction_without_defaults(config_class)
    assert config_class.has_no_defaults_at_init is True
    # transformers 5 logs and serializes a config by diffing against `cls()`.
    config = config_class.from_pretrained(str(remote), local_files_only=True)
    assert "internvl_chat" in repr(config)


def test_the_language_model_gets_the_resolved_attention(remote: Path) -> None:
    config = load_remote_config(remote, _raw(remote), "sdpa")
    # transformers 5 reads the implementation from this attribute (its own, not ours)
    assert config.llm_config._attn_implementation == "sdpa"  # noqa: SLF001


def test_without_the_fix_the_original_fallback_fails_on_transformers_5(remote: Path) -> None:
    """The original sets `attn_implementation`, which transformers 5 no longer reads."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: flash attention is then what the config asks for")
    from transformers import AutoModel

    config = load_remote_config(remote, _raw(remote), "flash_attention_2")
    with pytest.raises(ImportError, match="FlashAttention2"):
        AutoModel.from_pretrained(
            str(remote), config=config, local_files_only=True, trust_remote_code=True
        )


def test_the_engine_loads_the_remote_code_and_leaves_the_files_alone(remote: Path) -> None:
    before = _digests(remote)
    engine = create_engine(EngineConfig(remote, format="remote-code", max_new_tokens=2))
    assert isinstance(engine, RemoteCodeInternVLEngine)
    engine.load()
    assert engine.loaded
    language_config = engine.model.language_model.config
    assert language_config._attn_implementation == "sdpa"  # noqa: SLF001 - transformers' own
    assert _digests(remote) == before
