"""Original (`InternVLChatModel`) checkpoints converted to the native layout in memory.

An original checkpoint whose language model is Qwen2 (InternVL 2.5 1B/2B/...) is
converted while loading (fused `qkv` split, keys renamed, config translated), so the
fast, batched native code path runs the fine-tuned weights without any remote code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from processors.errors import ErrorCode, ProcessingError
from processors.internvl.checkpoint import CONVERTIBLE_LLMS, is_convertible, weight_files
from processors.internvl.config import STAGE

_PROJECTOR_KEYS = {
    "mlp1.0.": "model.multi_modal_projector.layer_norm.",
    "mlp1.1.": "model.multi_modal_projector.linear_1.",
    "mlp1.3.": "model.multi_modal_projector.linear_2.",
}
_VISION_LAYER_RULES: tuple[tuple[str, str], ...] = (
    ("attn.proj.", "attention.projection_layer."),
    ("attn.q_norm.", "attention.q_norm."),
    ("attn.k_norm.", "attention.k_norm."),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
)
_VISION_EMBEDDING_KEYS = {
    "vision_model.embeddings.class_embedding": "model.vision_tower.embeddings.cls_token",
    "vision_model.embeddings.position_embedding": (
        "model.vision_tower.embeddings.position_embeddings"
    ),
}
_VISION_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_PATCH_EMBEDDING = "vision_model.embeddings.patch_embedding."


def convert_original_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename (and split) original InternVLChatModel weights into the native layout.

    The mapping follows transformers' InternVL conversion: `vision_model.*` becomes
    `model.vision_tower.*` (fused `attn.qkv` split into q/k/v in that row order, `ls1/ls2`
    -> `lambda_1/2`, `norm1/2` -> `layernorm_before/after`), `mlp1.{0,1,3}` becomes the
    projector's `layer_norm/linear_1/linear_2`, `language_model.model.*` becomes
    `model.language_model.*` and `language_model.lm_head` becomes `lm_head`.

    Raises:
        ProcessingError: MODEL_NOT_LOADED on a key it does not know (LoRA adapters that
            were not merged, another language model family): a silent partial load would
            serve a broken model.
    """
    converted: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        converted.update(_convert_weight(key, tensor))
    return converted


def _convert_weight(key: str, tensor: Any) -> dict[str, Any]:
    """The native name(s) and tensor(s) of one original weight; raises on an unknown key."""
    if key.startswith("language_model.model."):
        return {"model.language_model." + key.removeprefix("language_model.model."): tensor}
    if key.startswith("language_model.lm_head."):
        return {"lm_head." + key.removeprefix("language_model.lm_head."): tensor}
    prefix = key[: len("mlp1.0.")]
    if prefix in _PROJECTOR_KEYS:
        return {_PROJECTOR_KEYS[prefix] + key[len(prefix) :]: tensor}
    if key in _VISION_EMBEDDING_KEYS:
        return {_VISION_EMBEDDING_KEYS[key]: tensor}
    if key.startswith(_PATCH_EMBEDDING):
        suffix = key.removeprefix(_PATCH_EMBEDDING)
        return {f"model.vision_tower.embeddings.patch_embeddings.projection.{suffix}": tensor}
    if match := _VISION_LAYER.match(key):
        layer, rest = match.groups()
        return _convert_vision_layer_weight(
            key, f"model.vision_tower.encoder.layer.{layer}.", rest, tensor
        )
    raise _unknown_key(key)


def _convert_vision_layer_weight(key: str, target: str, rest: str, tensor: Any) -> dict[str, Any]:
    """One weight of a vision-tower layer (`rest` after the layer prefix) under `target`."""
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        query, key_part, value = tensor.chunk(3, dim=0)
        return {
            target + f"attention.q_proj.{kind}": query,
            target + f"attention.k_proj.{kind}": key_part,
            target + f"attention.v_proj.{kind}": value,
        }
    if rest in ("ls1", "ls2"):
        return {target + f"lambda_{rest[-1]}": tensor}
    for old, new in _VISION_LAYER_RULES:
        if rest.startswith(old):
            return {target + new + rest[len(old) :]: tensor}
    raise _unknown_key(key)


def _unknown_key(key: str) -> ProcessingError:
    """The MODEL_NOT_LOADED error for an original weight with no native counterpart."""
    return ProcessingError(
        ErrorCode.MODEL_NOT_LOADED,
        f"cannot convert original InternVL weight {key!r} to the native layout "
        "(unmerged LoRA or unsupported variant); use format='remote-code'",
        STAGE,
    )


def convert_original_config(raw_config: Mapping[str, Any], image_token_id: int) -> Any:
    """A `transformers.InternVLConfig` equivalent to an original `internvl_chat` config.

    `image_token_id` is the tokenizer's `<IMG_CONTEXT>` id (the original config does not
    store it; `model.chat` looks it up in the tokenizer).

    Raises:
        ProcessingError: MODEL_NOT_LOADED for variants the native model cannot express.
    """
    from transformers import InternVLConfig

    if not is_convertible(raw_config):
        raise ProcessingError(
            ErrorCode.MODEL_NOT_LOADED,
            "original checkpoint is not convertible to the native layout (needs a "
            f"{'/'.join(CONVERTIBLE_LLMS)} language model and ps_version v2)",
            STAGE,
        )
    vision = raw_config["vision_config"]
    llm = {
        key: value
        for key, value in raw_config["llm_config"].items()
        if key
        not in ("architectures", "auto_map", "_name_or_path", "attn_implementation", "model_type")
    }
    llm["model_type"] = "qwen2"
    image_size = raw_config.get("force_image_size") or vision["image_size"]
    downsample_ratio = float(raw_config.get("downsample_ratio", 0.5))
    tokens = round((image_size // vision["patch_size"]) ** 2 * downsample_ratio**2)
    return InternVLConfig(
        vision_config=_native_vision_config(vision, image_size),
        text_config=llm,
        image_token_id=image_token_id,
        image_seq_length=tokens,
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=int(raw_config.get("select_layer", -1)),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
    )


def _native_vision_config(vision: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """The native vision-tower config of an original `vision_config`."""
    return {
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "hidden_act": vision.get("hidden_act", "gelu"),
        "norm_type": vision.get("norm_type", "rms_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "image_size": image_size,
        "patch_size": vision["patch_size"],
        "num_channels": vision.get("num_channels", 3),
        "attention_bias": bool(vision.get("qkv_bias", True)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
    }


def load_state_dict_files(model_path: Path) -> dict[str, Any]:
    """All tensors of a checkpoint folder (single or sharded safetensors, else .bin).

    `.bin` files are read with `weights_only=True`.

    Raises:
        ProcessingError: MODEL_NOT_LOADED when the folder holds no weights.
    """
    import torch
    from safetensors.torch import load_file

    files = weight_files(model_path)
    if not files:
        raise ProcessingError(
            ErrorCode.MODEL_NOT_LOADED,
            f"no weight files (*.safetensors, pytorch_model*.bin) in {model_path}",
            STAGE,
        )
    state: dict[str, Any] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state
