"""InternVL checkpoint folders: their layout, their weight files and a stable version id.

Two layouts exist for InternVL 2.5:

- **native**: `config.json` with `model_type == "internvl"`, loaded as
  `transformers.InternVLForConditionalGeneration` (the `-hf` checkpoints, or anything
  saved by that class).
- **original** (remote code): `config.json` with `model_type == "internvl_chat"` /
  architectures `["InternVLChatModel"]`, an `auto_map` and the modeling `.py` files in
  the folder. This is what the InternVL training scripts write, so a fine-tuned
  checkpoint is most likely in this layout.

Only local files are read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from processors.errors import ErrorCode, ProcessingError
from processors.internvl.config import STAGE

CheckpointKind = Literal["native", "original"]
CONVERTIBLE_LLMS = ("Qwen2ForCausalLM",)
"""Language-model architectures of an original checkpoint that convert to the native one."""


def read_checkpoint_config(model_path: Path) -> dict[str, Any]:
    """Parsed `config.json` of a checkpoint folder.

    Raises:
        ProcessingError: MODEL_NOT_LOADED when the folder or its config.json is missing,
            unreadable, not JSON or not a JSON object.
    """
    if not model_path.is_dir():
        raise ProcessingError(
            ErrorCode.MODEL_NOT_LOADED, f"model folder {model_path} does not exist", STAGE
        )
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise ProcessingError(
            ErrorCode.MODEL_NOT_LOADED, f"no config.json in model folder {model_path}", STAGE
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProcessingError(
            ErrorCode.MODEL_NOT_LOADED, f"unreadable {config_file}: {exc}", STAGE
        ) from exc
    if not isinstance(raw, dict):
        raise ProcessingError(
            ErrorCode.MODEL_NOT_LOADED, f"{config_file} is not a JSON object", STAGE
        )
    return raw


def checkpoint_kind(raw_config: Mapping[str, Any]) -> CheckpointKind:
    """Classify a parsed config.json as "native" or "original".

    Raises:
        ProcessingError: MODEL_NOT_LOADED for any other model type.
    """
    architectures = raw_config.get("architectures") or []
    model_type = raw_config.get("model_type")
    if model_type == "internvl" or "InternVLForConditionalGeneration" in architectures:
        return "native"
    if model_type == "internvl_chat" or "InternVLChatModel" in architectures:
        return "original"
    raise ProcessingError(
        ErrorCode.MODEL_NOT_LOADED,
        f"unsupported checkpoint: model_type={model_type!r}, architectures={architectures!r} "
        "(expected InternVL native or InternVLChatModel)",
        STAGE,
    )


def is_convertible(raw_config: Mapping[str, Any]) -> bool:
    """True if an original checkpoint can be converted to the native architecture."""
    llm = raw_config.get("llm_config") or {}
    vision = raw_config.get("vision_config") or {}
    llm_archs = llm.get("architectures") or []
    return (
        bool(vision)
        and bool(llm_archs)
        and llm_archs[0] in CONVERTIBLE_LLMS
        and raw_config.get("ps_version", "v2") == "v2"
    )


def has_remote_code(model_path: Path, raw_config: Mapping[str, Any]) -> bool:
    """True if the folder carries the modeling code its `auto_map` names."""
    auto_map = raw_config.get("auto_map") or {}
    target = auto_map.get("AutoModel")
    if not isinstance(target, str) or "." not in target:
        return False
    module = target.split("--")[-1].rsplit(".", 1)[0]
    return (model_path / f"{module}.py").is_file()


def weight_files(model_path: Path) -> list[Path]:
    """The weight files of a folder: `*.safetensors`, else `pytorch_model*.bin`, sorted."""
    files = sorted(model_path.glob("*.safetensors"))
    return files or sorted(model_path.glob("pytorch_model*.bin"))


def model_version_id(prefix: str, model_path: Path) -> str:
    """Stable id: `{prefix}:{folder}:{12 hex of sha256(config.json, weight names and sizes)}`."""
    digest = hashlib.sha256()
    config_file = model_path / "config.json"
    if config_file.is_file():
        digest.update(config_file.read_bytes())
    for weight in weight_files(model_path):
        digest.update(f"{weight.name}:{weight.stat().st_size};".encode())
    return f"{prefix}:{model_path.name}:{digest.hexdigest()[:12]}"
