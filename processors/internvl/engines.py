"""InternVL engines: the Hugging Face native model and the original remote-code format.

Two checkpoint layouts exist for InternVL 2.5:

- **native**: `config.json` with `model_type == "internvl"`, loaded as
  `transformers.InternVLForConditionalGeneration` (the `-hf` checkpoints, or anything
  saved by that class).
- **original** (remote code): `config.json` with `model_type == "internvl_chat"` /
  architectures `["InternVLChatModel"]`, an `auto_map` and the modeling `.py` files in
  the folder. This is what the InternVL training scripts write, so the user's
  fine-tuned checkpoint is most likely in this layout.

`NativeInternVLEngine` serves both: an original checkpoint whose language model is
Qwen2 (InternVL 2.5 1B/2B/...) is converted to the native layout in memory while
loading (fused `qkv` split, keys renamed, config translated), so the fast, batched
native code path runs the fine-tuned weights without any remote code.
`RemoteCodeInternVLEngine` runs the checkpoint's own code (`trust_remote_code=True`,
local files only), building the inputs exactly as the original `model.chat` does; it
is the fallback for original checkpoints that cannot be converted.

Both engines follow the prompt convention of `processors.inference`: one `<image>`
placeholder per image, expanded into `<img>` + `<IMG_CONTEXT>` x (tokens per tile x
tiles) + `</img>`, inside the checkpoint's own chat template (config.json `template`,
read from the folder's `conversation.py` when it has one: `processors.chat_templates`),
exactly as the original `model.chat`/`batch_chat` build it. Generation
is greedy (`do_sample=False`), stops at `<|im_end|>`, and decodes only the new tokens.

The native engine's default decode path (`EngineConfig.decode="static"`) does not call
`generate`: the vision tower runs over all tiles of a batch in fixed-size tile batches
(pinned host memory; the first image of each request, the vendor image, goes through a
content-addressed, memory-bounded feature cache), the language model prefills in
sub-batches of right-padded, length-sorted prompts, and `StaticGreedyDecoder` decodes
greedily over a static KV cache whose step is replayed as a CUDA graph (optionally
`torch.compile`d first). When one call holds several batches, the next batch's vision
work is queued while the current one decodes. Greedy ids equal `generate`'s in float32
(tests on CPU; checked on an H100 at the full 1B shape); in bfloat16 the different kernel
choice makes long answers drift, as batched `generate` does. `decode="generate"` keeps the
original path.

Nothing here reads the environment or touches CUDA at import time; weights are loaded
in `load()`, never in `__init__`. Only local files are read (`local_files_only=True`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from processors.chat_templates import (
    DEFAULT_TEMPLATE,
    INTERNVL2_5,
    ChatTemplate,
    resolve_chat_template,
)
from processors.constrained import ConstrainedRows, GrammarCache
from processors.decode_attention import SplitKeyAttention
from processors.errors import ErrorCode, ProcessingError
from processors.inference import IMAGE_PLACEHOLDER, InferenceEngine, PreparedRequest

STAGE = "model"


@contextmanager
def coded_failure(code: ErrorCode, what: str) -> Iterator[None]:
    """Let `ProcessingError` through; turn any other exception into `code`, prefixed by `what`."""
    try:
        yield
    except ProcessingError:
        raise
    except Exception as exc:
        raise ProcessingError(code, f"{what}: {type(exc).__name__}: {exc}"[:2000], STAGE) from exc


INTERNVL25_SYSTEM_MESSAGE = INTERNVL2_5.system_message
"""The system message of the original `internvl2_5` conversation template."""

# Vocabulary tokens, not secrets (S105 matches on the word TOKEN).
IMG_START_TOKEN = "<img>"  # noqa: S105
IMG_END_TOKEN = "</img>"  # noqa: S105
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"  # noqa: S105
IM_START_TOKEN = "<|im_start|>"  # noqa: S105
IM_END_TOKEN = "<|im_end|>"  # noqa: S105

DeviceName = str
DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
AttnName = Literal["auto", "sdpa", "eager", "flash_attention_2"]
FormatName = Literal["auto", "native", "remote-code"]
DecodeName = Literal["auto", "static", "generate"]
DecodeAttentionName = Literal["auto", "split", "sdpa"]
CheckpointKind = Literal["native", "original"]

_DTYPES = ("auto", "bfloat16", "float16", "float32")
_ATTNS = ("auto", "sdpa", "eager", "flash_attention_2")
_FORMATS = ("auto", "native", "remote-code")
_DECODES = ("auto", "static", "generate")
_DECODE_ATTENTIONS = ("auto", "split", "sdpa")
_CONVERTIBLE_LLMS = ("Qwen2ForCausalLM",)
TIMING_STAGES = ("tokenize", "transfer", "vision", "prefill", "decode", "generate")
"""Keys of `engine.timings` (seconds; "generate" is the whole `generate` path's model time)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to load and run an InternVL checkpoint.

    Attributes:
        model_path: local folder of the checkpoint (never a hub id: nothing is downloaded).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (bfloat16 on GPU, float32 on CPU) or an explicit dtype name.
        max_new_tokens: generation budget per request (the original service used 2000).
        attn_implementation: "auto" (flash_attention_2 on GPU when the `flash_attn`
            package is installed, else sdpa), or an explicit implementation.
        max_batch_size: the model's maximum batch; larger pipeline batches are split.
        format: "auto" (detect from config.json), "native" (native engine; converts an
            original Qwen2-based checkpoint) or "remote-code" (the checkpoint's own code).
        system_message: replaces the system message of the checkpoint's chat template;
            None (the default) keeps the checkpoint's own (see
            `processors.chat_templates.resolve_chat_template`), which is what the
            fine-tuning used.
        decode: "auto" (the native engine's own static-cache greedy loop, "static"; the
            remote-code engine always uses "generate"), "static", or "generate" (the
            checkpoint's `generate`, dynamic cache: the original one-call-per-batch path).
        min_new_tokens: `<|im_end|>` is suppressed before this many new tokens (0 in
            production; benchmarks force a fixed answer length with it).
        cuda_graphs: on CUDA, replay each decode step of the static path as a CUDA graph
            (one graph per batch size and cache length).
        prefill_batch_size: rows per language-model prefill call of the static path.
        vision_batch_tiles: tiles per vision-tower call of the static path.
        cache_length_bucket: the static KV cache length (prompt + max_new_tokens) is
            rounded up to a multiple of this, so few graph shapes exist.
        feature_cache_mb: memory bound of the content-addressed cache of projected image
            features (0 disables it); least recently used entries are evicted first.
        feature_cache_images: the first N images of each request are cache candidates (the
            vendor images, which repeat across returns, come first in the prompt).
        compile_vision: on CUDA, `torch.compile` each vision-tower layer (fuses the norms,
            activations and layer scales around the matrix products; one compilation is
            shared by the identical layers) and run the patch embedding as a matrix product
            (`patch_projection_as_matmul`). Off by default: it costs a compilation at
            the first batch and changes the model object in place.
        compile_decode: on CUDA, `torch.compile` the static path's decode layer (fusing its
            many small element-wise kernels; dynamic shapes, so one compilation serves every
            layer, batch size and cache length) before the step is captured as a CUDA graph. Off by
            default (the first batch pays the compilation).
        compile_prefill: on CUDA, `torch.compile` the static path's prefill layer (norms,
            rotary embedding, residuals and the gated MLP fused around the matrix products
            and attention; dynamic shapes, one compilation for every layer, row count and
            prompt length). Off by default (the first batch pays the compilation).
        decode_attention: attention of the static path's decode steps. "split" reads only
            each row's prompt and generated columns of the KV cache, split across
            `attention_splits` programs per row and key/value head (Triton; CUDA only);
            "sdpa" is one masked `scaled_dot_product_attention` over the whole cache;
            "auto" is "split" on CUDA when Triton is installed, else "sdpa".
        attention_splits: programs per (row, key/value head) of the "split" attention.
        constrained_decoding: the static path decodes each request that carries an
            `answer_schema` inside that schema's grammar (`processors.constrained`), so its
            answer always parses and validates; requests without one decode freely. The
            "generate" path and the remote-code engine never constrain.
        grammar_threads: CPU threads that fill the next-token bitmasks of a batch.

    Raises `ValueError` on construction when a value is out of its domain.
    """

    model_path: Path | str
    device: DeviceName = "auto"
    dtype: DtypeName = "auto"
    max_new_tokens: int = 2000
    attn_implementation: AttnName = "auto"
    max_batch_size: int = 32
    format: FormatName = "auto"
    system_message: str | None = None
    decode: DecodeName = "auto"
    min_new_tokens: int = 0
    cuda_graphs: bool = True
    prefill_batch_size: int = 16
    vision_batch_tiles: int = 128
    cache_length_bucket: int = 128
    feature_cache_mb: int = 512
    feature_cache_images: int = 1
    compile_vision: bool = False
    compile_decode: bool = False
    compile_prefill: bool = False
    decode_attention: DecodeAttentionName = "auto"
    attention_splits: int = 1
    constrained_decoding: bool = True
    grammar_threads: int = 4

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}"
            )
        if self.decode not in _DECODES:
            raise ValueError(f"decode must be one of {_DECODES}, got {self.decode!r}")
        if self.decode_attention not in _DECODE_ATTENTIONS:
            raise ValueError(
                f"decode_attention must be one of {_DECODE_ATTENTIONS}, "
                f"got {self.decode_attention!r}"
            )
        for name in (
            "prefill_batch_size",
            "vision_batch_tiles",
            "cache_length_bucket",
            "attention_splits",
            "grammar_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.feature_cache_mb < 0 or self.feature_cache_images < 0:
            raise ValueError("feature_cache_mb and feature_cache_images must be >= 0")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.attn_implementation not in _ATTNS:
            raise ValueError(
                f"attn_implementation must be one of {_ATTNS}, got {self.attn_implementation!r}"
            )
        if self.format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {self.format!r}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# --------------------------------------------------------------------------- prompts


def build_chat_prompt(question: str, template: ChatTemplate = DEFAULT_TEMPLATE) -> str:
    """One user turn and the open assistant turn, as `get_conv_template(...).get_prompt()`.

    With the default `internvl2_5` template:
    `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n`
    `<|im_start|>assistant\\n`.
    """
    return template.prompt(question)


def expand_image_placeholders(
    prompt: str,
    num_patches: Sequence[int],
    tokens_per_tile: int,
    context_token: str = IMG_CONTEXT_TOKEN,
) -> str:
    """Replace the i-th `<image>` by `<img>` + context x (tokens_per_tile x tiles[i]) + `</img>`.

    Raises `ProcessingError(INVALID_REQUEST)` when the number of placeholders differs from
    `len(num_patches)`, when a tile count is < 1, or when the prompt already holds image
    tokens (they would desynchronise image features and placeholders).
    """
    for token in (IMG_START_TOKEN, IMG_END_TOKEN, context_token):
        if token in prompt:
            raise ProcessingError(
                ErrorCode.INVALID_REQUEST, f"prompt contains the reserved token {token}", STAGE
            )
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(num_patches):
        raise ProcessingError(
            ErrorCode.INVALID_REQUEST,
            f"prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders "
            f"but num_patches lists {len(num_patches)} images",
            STAGE,
        )
    if any(count < 1 for count in num_patches):
        raise ProcessingError(
            ErrorCode.INVALID_REQUEST, f"num_patches must be >= 1 each, got {num_patches}", STAGE
        )
    pieces = [parts[0]]
    for count, rest in zip(num_patches, parts[1:], strict=True):
        pieces.append(IMG_START_TOKEN + context_token * (tokens_per_tile * count) + IMG_END_TOKEN)
        pieces.append(rest)
    return "".join(pieces)


# ------------------------------------------------------------------- checkpoint layout


def read_checkpoint_config(model_path: Path) -> dict[str, Any]:
    """Parsed `config.json`; `ProcessingError(MODEL_NOT_LOADED)` if missing or not JSON."""
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
    """Classify a parsed config.json as "native" or "original"; MODEL_NOT_LOADED otherwise."""
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
        and llm_archs[0] in _CONVERTIBLE_LLMS
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


# ----------------------------------------------------------------- original -> native

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


def convert_original_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename (and split) original InternVLChatModel weights into the native layout.

    The mapping follows transformers' InternVL conversion: `vision_model.*` becomes
    `model.vision_tower.*` (fused `attn.qkv` split into q/k/v in that row order, `ls1/ls2`
    -> `lambda_1/2`, `norm1/2` -> `layernorm_before/after`), `mlp1.{0,1,3}` becomes the
    projector's `layer_norm/linear_1/linear_2`, `language_model.model.*` becomes
    `model.language_model.*` and `language_model.lm_head` becomes `lm_head`.

    Raises `ProcessingError(MODEL_NOT_LOADED)` on a key it does not know (LoRA adapters
    that were not merged, another language model family): a silent partial load would
    serve a broken model.
    """
    converted: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        if key.startswith("language_model.model."):
            converted["model.language_model." + key.removeprefix("language_model.model.")] = tensor
        elif key.startswith("language_model.lm_head."):
            converted["lm_head." + key.removeprefix("language_model.lm_head.")] = tensor
        elif key[: len("mlp1.0.")] in _PROJECTOR_KEYS:
            prefix = key[: len("mlp1.0.")]
            converted[_PROJECTOR_KEYS[prefix] + key[len(prefix) :]] = tensor
        elif key in _VISION_EMBEDDING_KEYS:
            converted[_VISION_EMBEDDING_KEYS[key]] = tensor
        elif key.startswith("vision_model.embeddings.patch_embedding."):
            suffix = key.removeprefix("vision_model.embeddings.patch_embedding.")
            converted[f"model.vision_tower.embeddings.patch_embeddings.projection.{suffix}"] = (
                tensor
            )
        elif match := _VISION_LAYER.match(key):
            layer, rest = match.groups()
            target = f"model.vision_tower.encoder.layer.{layer}."
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                query, key_part, value = tensor.chunk(3, dim=0)
                converted[target + f"attention.q_proj.{kind}"] = query
                converted[target + f"attention.k_proj.{kind}"] = key_part
                converted[target + f"attention.v_proj.{kind}"] = value
            elif rest in ("ls1", "ls2"):
                converted[target + f"lambda_{rest[-1]}"] = tensor
            else:
                for old, new in _VISION_LAYER_RULES:
                    if rest.startswith(old):
                        converted[target + new + rest[len(old) :]] = tensor
                        break
                else:
                    raise _unknown_key(key)
        else:
            raise _unknown_key(key)
    return converted


def _unknown_key(key: str) -> ProcessingError:
    return ProcessingError(
        ErrorCode.MODEL_NOT_LOADED,
        f"cannot convert original InternVL weight {key!r} to the native layout "
        "(unmerged LoRA or unsupported variant); use format='remote-code'",
        STAGE,
    )


def convert_original_config(raw_config: Mapping[str, Any], image_token_id: int) -> Any:
    """A `transformers.InternVLConfig` equivalent to an original `internvl_chat` config.

    `image_token_id` is the tokenizer's `<IMG_CONTEXT>` id (the original config does not
    store it; `model.chat` looks it up in the tokenizer). Raises
    `ProcessingError(MODEL_NOT_LOADED)` for variants the native model cannot express.
    """
    from transformers import InternVLConfig

    if not is_convertible(raw_config):
        raise ProcessingError(
            ErrorCode.MODEL_NOT_LOADED,
            "original checkpoint is not convertible to the native layout (needs a "
            f"{'/'.join(_CONVERTIBLE_LLMS)} language model and ps_version v2)",
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
    vision_config = {
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
    downsample_ratio = float(raw_config.get("downsample_ratio", 0.5))
    tokens = round((image_size // vision["patch_size"]) ** 2 * downsample_ratio**2)
    return InternVLConfig(
        vision_config=vision_config,
        text_config=llm,
        image_token_id=image_token_id,
        image_seq_length=tokens,
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=int(raw_config.get("select_layer", -1)),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
    )


def load_state_dict_files(model_path: Path) -> dict[str, Any]:
    """All tensors of a checkpoint folder (single or sharded safetensors, else .bin).

    `.bin` files are read with `weights_only=True`. Raises
    `ProcessingError(MODEL_NOT_LOADED)` when the folder holds no weights.
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


# ------------------------------------------------------------------------- devices


def resolve_device(config: EngineConfig) -> str:
    """The torch device string: "auto" becomes "cuda" when CUDA is available, else "cpu"."""
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def resolve_dtype(config: EngineConfig, device: str) -> Any:
    """A `torch.dtype`: "auto" is bfloat16 on GPU and float32 on CPU."""
    import torch

    if config.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, config.dtype)


def resolve_attn_implementation(config: EngineConfig, device: str) -> str:
    """Resolve "auto" to flash_attention_2 on GPU when `flash_attn` is installed, else sdpa."""
    if config.attn_implementation != "auto":
        return config.attn_implementation
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


# ------------------------------------------------------------------ static fast path


def content_key(tiles: Any) -> str:
    """Content address of an image's tiles: sha256 over shape, dtype and raw bytes."""
    import torch

    array = tiles.detach().to("cpu").contiguous()
    if array.dtype == torch.bfloat16:
        array = array.view(torch.int16)
    digest = hashlib.sha256(f"{tuple(array.shape)}:{array.dtype}".encode())
    digest.update(memoryview(array.numpy()).cast("B"))
    return digest.hexdigest()


class FeatureCache:
    """Memory-bounded LRU of projected image features, keyed by `content_key`.

    Vendor images repeat across the returns of a product; their vision-tower output is
    reused instead of recomputed. Values stay on the model's device; `max_bytes` bounds
    the sum of their sizes (an entry larger than the bound is not kept).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and zero the counters."""
        self._entries.clear()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: str) -> Any:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        size = int(value.numel() * value.element_size())
        if key in self._entries or size > self.max_bytes:
            return
        # A clone, so the entry does not pin the whole batch's feature tensor.
        self._entries[key] = value.clone()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= int(evicted.numel() * evicted.element_size())


def patch_projection_as_matmul(conv: Any) -> bool:
    """Run a patch-embedding convolution (kernel == stride, no padding) as one matmul.

    The same function as the convolution (each output pixel is one patch times the
    flattened kernel), but cuDNN runs this convolution shape on a slow non-tensor-core
    path on H100 (about 17 ms for 256 tiles against well under 1 ms as a matrix product).
    Replaces `conv.forward` on this instance; parameters and state dict are unchanged.
    Returns False, and changes nothing, when the convolution is not of that form.
    """
    if (
        tuple(conv.kernel_size) != tuple(conv.stride)
        or any(conv.padding)
        or any(d != 1 for d in conv.dilation)
        or conv.groups != 1
    ):
        return False

    def forward(pixels: Any) -> Any:
        import torch

        batch, channels, height, width = pixels.shape
        kernel_h, kernel_w = conv.kernel_size
        rows, cols = height // kernel_h, width // kernel_w
        patches = pixels[:, :, : rows * kernel_h, : cols * kernel_w]
        patches = patches.reshape(batch, channels, rows, kernel_h, cols, kernel_w)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch * rows * cols, -1)
        weight = conv.weight.reshape(conv.out_channels, -1)
        bias = conv.bias
        out = patches @ weight.t() if bias is None else torch.addmm(bias, patches, weight.t())
        return out.view(batch, rows, cols, -1).permute(0, 3, 1, 2)

    conv.forward = forward
    return True


def attention_geometry(text_config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a Qwen2 text config."""
    heads = int(text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads, int(text_config.num_key_value_heads), int(head_dim)


@dataclass
class _DecodeSession:
    """Static buffers of one (batch, cache length) shape, and its CUDA graph if any."""

    batch: int
    length: int
    keys: list[Any]
    values: list[Any]
    tokens: Any  # (batch,) the token fed to the next step
    pads: Any  # (batch,) right-padding columns of each row's prompt
    prompt_end: Any  # () padded prompt length: generated tokens start at this column
    column: Any  # () cache column the next step writes
    step: Any  # () index of the token the next step produces
    out: Any  # (batch, max_new_tokens) generated ids
    graph: Any = None
    prompt_length: int = 0  # padded prompt length of the rows now in the buffers
    forward_graph: Any = None  # constrained decoding: the step up to the logits only
    logits: Any = None  # the forward graph's output (batch, vocab)


class StaticGreedyDecoder:
    """Greedy decoding of the InternVL language model (Qwen2) over a static KV cache.

    Prefill runs the checkpoint's own modules (norms, projections, MLP, rotary embedding)
    layer by layer, as `Qwen2DecoderLayer` does, on prompts padded on the right: causal
    attention never looks at a later pad, so no mask is needed and the fused causal kernel
    runs; positions are 0..n-1 as with left padding. Each layer's key/value states go
    straight into preallocated per-layer buffers of shape (batch, kv heads, length, head
    dim); generated tokens go to the columns after the padded prompt. Each decode step
    reuses the same modules (norms, projections, MLP, rotary embedding, lm_head) with the
    attention written here: the grouped query heads of a key/value head attend together
    to the row's real prompt and its generated tokens, through the split-key kernel
    (`processors.decode_attention`, CUDA) or one masked `scaled_dot_product_attention`
    call. The step only touches static buffers, so on CUDA it is captured once per shape
    as a CUDA graph and replayed (no host work per token). `compile_step` and
    `compile_prefill` compile the per-layer functions (one compilation for all layers).
    `min_new_tokens` suppresses `<|im_end|>` exactly as
    `MinNewTokensLengthLogitsProcessor` does.
    """

    max_sessions = 2
    launch_ahead = 128

    def __init__(
        self,
        model: Any,
        *,
        eos_id: int,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        length_bucket: int = 256,
        cuda_graphs: bool = True,
        check_every: int = 16,
        compile_step: bool = False,
        compile_prefill: bool = False,
        split_attention: bool = False,
        attention_splits: int = 1,
    ) -> None:
        import torch

        self.model = model
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        text = self.language_model.config
        self.layers = list(self.language_model.layers[: text.num_hidden_layers])
        self.heads, self.kv_heads, self.head_dim = attention_geometry(text)
        self.image_token_id = int(model.config.image_token_id)
        self.eos_id = eos_id
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.length_bucket = length_bucket
        self.cuda_graphs = cuda_graphs
        self.check_every = check_every
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype
        self._sessions: OrderedDict[tuple[int, int], _DecodeSession] = OrderedDict()
        self._split_attention: SplitKeyAttention | None = None
        if split_attention:
            if not SplitKeyAttention.supports(self.head_dim, self.heads // self.kv_heads):
                raise ValueError(
                    f"the split-key attention does not support head_dim {self.head_dim} with "
                    f"{self.heads // self.kv_heads} query heads per key/value head"
                )
            self._split_attention = SplitKeyAttention(splits=attention_splits)
        self._run_decode_layer: Any = self._decode_layer
        if compile_step:
            self._run_decode_layer = torch.compile(self._decode_layer, dynamic=True)
        self._run_prefill_layer: Any = self._prefill_layer
        if compile_prefill:
            self._run_prefill_layer = torch.compile(self._prefill_layer, dynamic=True)
        self.compile_error: str | None = None

    @property
    def split_attention(self) -> bool:
        """Whether decode steps use the split-key kernel (else masked SDPA)."""
        return self._split_attention is not None

    # ----------------------------------------------------------------- sessions

    def cache_length(self, prompt_length: int) -> int:
        needed = prompt_length + self.max_new_tokens
        return -(-needed // self.length_bucket) * self.length_bucket

    def session(self, batch: int, prompt_length: int) -> _DecodeSession:
        """The static buffers (and graph) for this batch size and bucketed length.

        `prompt_length` is the chunk's longest prompt: generated tokens go to the columns
        from there on, whatever the padded width of each prefill call.
        """
        found = self._session(batch, self.cache_length(prompt_length))
        found.prompt_length = prompt_length
        found.prompt_end.fill_(prompt_length)
        return found

    def _session(self, batch: int, length: int) -> _DecodeSession:
        import torch

        key = (batch, length)
        found = self._sessions.get(key)
        if found is not None:
            self._sessions.move_to_end(key)
            return found
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        shape = (batch, self.kv_heads, length, self.head_dim)
        options = {"device": self.device, "dtype": self.dtype}
        session = _DecodeSession(
            batch=batch,
            length=length,
            keys=[torch.zeros(shape, **options) for _ in self.layers],
            values=[torch.zeros(shape, **options) for _ in self.layers],
            tokens=torch.zeros(batch, dtype=torch.long, device=self.device),
            pads=torch.zeros(batch, dtype=torch.long, device=self.device),
            prompt_end=torch.zeros((), dtype=torch.long, device=self.device),
            column=torch.zeros((), dtype=torch.long, device=self.device),
            step=torch.zeros((), dtype=torch.long, device=self.device),
            out=torch.zeros((batch, self.max_new_tokens), dtype=torch.long, device=self.device),
        )
        if self.cuda_graphs:
            try:
                session.graph = self._capture(session)
            except Exception as exc:  # a compiled step that cannot be captured: run eagerly
                if self._run_decode_layer == self._decode_layer:
                    raise
                self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
                self._run_decode_layer = self._decode_layer
                session.graph = self._capture(session)
        self._sessions[key] = session
        return session

    def _capture(self, session: _DecodeSession) -> Any:
        import torch

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernel selection and workspaces outside the graph
                session.column.zero_()
                session.step.zero_()
                self._step(session)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        session.column.zero_()
        session.step.zero_()
        with torch.cuda.graph(graph):
            self._step(session)
        return graph

    # ------------------------------------------------------------------ prefill

    def prefill(
        self,
        session: _DecodeSession,
        first_row: int,
        input_ids: Any,
        lengths: Any,
        image_features: Any,
        image_tokens: int | None = None,
        constraint: ConstrainedRows | None = None,
    ) -> Any:
        """Prefill rows [first_row, first_row + len(input_ids)) of `session`.

        `input_ids` are right-padded to their own longest prompt (at most the session's
        `prompt_length`: a call of short prompts computes no padding up to the chunk's
        longest); `lengths` holds each row's real length. Returns the first generated
        token of each row (greedy, `<|im_end|>` suppressed while min_new_tokens is not
        reached). `image_tokens`, the count of image tokens in `input_ids` when the caller
        knows it (from host memory), spares a device synchronisation to count them.
        `constraint` (its bitmask filled for these rows) masks the first token instead of
        the `<|im_end|>` suppression.
        """
        import torch

        language_model = self.language_model
        embeds = language_model.embed_tokens(input_ids)
        if image_features is not None:
            image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
            if image_tokens is None:
                image_tokens = int(image_mask.sum())
            if image_tokens * embeds.shape[-1] != image_features.numel():
                raise ProcessingError(
                    ErrorCode.INVALID_REQUEST,
                    "image features and image tokens do not match",
                    STAGE,
                )
            embeds = embeds.masked_scatter(image_mask, image_features.to(embeds.dtype))
        batch, width = int(input_ids.shape[0]), int(input_ids.shape[1])
        if width > session.prompt_length:
            raise ValueError(
                f"prompt of {width} tokens is longer than the session's {session.prompt_length}"
            )
        position_ids = torch.arange(width, device=input_ids.device)[None, :]
        cos, sin = language_model.rotary_emb(embeds, position_ids)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (1, width, 1, head_dim): rows alike
        rows = slice(first_row, first_row + batch)
        hidden = embeds
        for index, layer in enumerate(self.layers):
            hidden, key, value = self._run_prefill_layer(layer, hidden, cos, sin)
            session.keys[index][rows, :, :width] = key
            session.values[index][rows, :, :width] = value
        session.pads[rows] = session.prompt_length - lengths
        # The final norm is per token: normalise only each row's last real token.
        last = hidden[torch.arange(batch, device=lengths.device), lengths - 1]
        last = language_model.norm(last)
        logits = self.lm_head(last[:, None, :])[:, -1, :].float()
        if constraint is not None:
            constraint.apply(logits, rows)
        elif self.min_new_tokens > 0:
            logits[:, self.eos_id] = -float("inf")
        return logits.argmax(-1)

    def _prefill_layer(self, layer: Any, hidden: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """One decoder layer over whole prompts: (hidden out, rotated keys, values).

        The computation of `Qwen2DecoderLayer` with causal attention and no cache object
        (the caller writes keys and values straight into the static buffers); a free
        function of its tensors, so one compilation serves every layer and shape.
        """
        import torch.nn.functional as functional

        batch, length = hidden.shape[0], hidden.shape[1]
        query, key, value = self._rotated_projections(layer, hidden, cos, sin)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        attended = functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=layer.self_attn.scaling, enable_gqa=True
        )
        attended = attended.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self._layer_output(layer, hidden, attended), key, value

    def _rotated_projections(
        self, layer: Any, hidden: Any, cos: Any, sin: Any
    ) -> tuple[Any, Any, Any]:
        """A layer's query, key and value, (batch, length, heads, dim), rotary applied.

        The rotary embedding works in the projections' own layout: a transposed copy
        would cost several times as much; attention then takes transposed views.
        """
        batch, length = hidden.shape[0], hidden.shape[1]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = attention.q_proj(normed).view(batch, length, self.heads, self.head_dim)
        key = attention.k_proj(normed).view(batch, length, self.kv_heads, self.head_dim)
        value = attention.v_proj(normed).view(batch, length, self.kv_heads, self.head_dim)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        return query, key, value

    @staticmethod
    def _layer_output(layer: Any, hidden: Any, attended: Any) -> Any:
        """The rest of the layer after attention: output projection, residuals, MLP."""
        hidden = hidden + layer.self_attn.o_proj(attended)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    # ------------------------------------------------------------------- decode

    def decode(
        self,
        session: _DecodeSession,
        first_tokens: Any,
        while_running: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """Greedy tokens of every row (max_new_tokens each, early exit once all ended).

        `while_running` is called once the first `launch_ahead` steps are queued on the
        GPU (before any wait), so host work for the next batch overlaps this decode.
        """
        session.tokens.copy_(first_tokens)
        session.out[:, 0] = first_tokens
        session.step.fill_(1)
        session.column.fill_(session.prompt_length)
        produced = 1
        pending = while_running
        while produced < self.max_new_tokens:
            if session.graph is not None:
                session.graph.replay()
            else:
                self._step(session)
            produced += 1
            if pending is not None:
                if produced < min(self.launch_ahead, self.max_new_tokens):
                    continue  # no early-exit checks (they wait for the GPU) until it ran
                pending()
                pending = None
            if produced % self.check_every == 0 and self._all_ended(session, produced):
                break
        if pending is not None:
            pending()
        rows: list[list[int]] = session.out[:, :produced].tolist()
        return rows

    def decode_constrained(
        self,
        session: _DecodeSession,
        first_tokens: Any,
        constraint: ConstrainedRows,
        while_running: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """Greedy tokens of every row, each constrained row inside its grammar.

        Per step: the forward pass is queued (one CUDA graph up to the logits), the
        bitmasks are filled on CPU threads meanwhile, then applied on the device before
        the argmax; the chosen ids come back to the host (the one synchronisation of the
        step, which the matchers need) and advance the matchers. Stops once every row has
        ended (`<|im_end|>`) or at `max_new_tokens`. `min_new_tokens` is not applied: a
        complete answer may only end. `while_running` is called after the first step
        is queued.
        """
        import torch

        session.tokens.copy_(first_tokens)
        session.out[:, 0] = first_tokens
        session.step.fill_(1)
        session.column.fill_(session.prompt_length)
        host: list[int] = first_tokens.tolist()
        constraint.advance(host)
        ended = [token == self.eos_id for token in host]
        produced = 1
        on_cuda = self.device.type == "cuda"
        chosen_host = torch.empty(session.batch, dtype=torch.long, pin_memory=on_cuda)
        if on_cuda and self.cuda_graphs and session.forward_graph is None:
            self._capture_forward(session)
        pending = while_running
        while produced < self.max_new_tokens and not all(ended):
            if session.forward_graph is not None:
                session.forward_graph.replay()
                logits = session.logits
            else:
                logits = self._forward(session)
            if pending is not None:
                pending()
                pending = None
            constraint.fill()  # on CPU threads, while the GPU runs the forward pass
            constraint.apply(logits)
            chosen = logits.argmax(-1)
            self._commit(session, chosen)
            chosen_host.copy_(chosen, non_blocking=on_cuda)
            if on_cuda:
                torch.cuda.current_stream(self.device).synchronize()
            host = chosen_host.tolist()
            constraint.advance(host)
            ended = [done or token == self.eos_id for done, token in zip(ended, host, strict=True)]
            produced += 1
        if pending is not None:
            pending()
        rows: list[list[int]] = session.out[:, :produced].tolist()
        return rows

    def _capture_forward(self, session: _DecodeSession) -> None:
        """Capture the step up to the logits as a CUDA graph (`session.logits` its output).

        The warm-up runs advance no counter, so the session's state is left as it was."""
        import torch

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(session)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            session.logits = self._forward(session)
        session.forward_graph = graph

    def _all_ended(self, session: _DecodeSession, produced: int) -> bool:
        if produced < self.min_new_tokens:
            return False
        return bool((session.out[:, :produced] == self.eos_id).any(-1).all())

    def _step(self, session: _DecodeSession) -> None:
        """One greedy step for every row, on static buffers only (graph-capturable)."""
        logits = self._forward(session)
        if self.min_new_tokens > 0:
            suppress = session.step < self.min_new_tokens
            logits[:, self.eos_id] = logits[:, self.eos_id].masked_fill(suppress, -float("inf"))
        self._commit(session, logits.argmax(-1))

    def _commit(self, session: _DecodeSession, chosen: Any) -> None:
        """Record the chosen tokens and move every row one column on."""
        session.out.index_copy_(1, session.step.view(1), chosen[:, None])
        session.tokens.copy_(chosen)
        session.column.add_(1)
        session.step.add_(1)

    def _forward(self, session: _DecodeSession) -> Any:
        """The logits (batch, vocab, float32) of the next token of every row."""
        import torch

        # Sizes from tensor shapes (not the session's ints): a compiled layer with dynamic
        # shapes then serves every batch size and cache length without recompiling.
        length = session.keys[0].shape[2]
        language_model = self.language_model
        hidden = language_model.embed_tokens(session.tokens[:, None])  # (batch, 1, hidden)
        prompt_lengths = session.prompt_end - session.pads
        positions = (session.column - session.pads)[:, None]  # real length + generated
        cos, sin = language_model.rotary_emb(hidden, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (batch, 1, 1, head_dim): heads alike
        mask = None
        if self._split_attention is None:
            columns = torch.arange(length, device=session.tokens.device)[None, :]
            prompt = columns < prompt_lengths[:, None]
            generated = (columns >= session.prompt_end) & (columns <= session.column)
            mask = (prompt | generated)[:, None, None, :]  # (batch, 1, 1, length)
        for index, layer in enumerate(self.layers):
            hidden = self._run_decode_layer(
                layer,
                hidden,
                cos,
                sin,
                session.keys[index],
                session.values[index],
                session.column,
                session.prompt_end,
                prompt_lengths,
                mask,
            )
        hidden = language_model.norm(hidden)
        return self.lm_head(hidden)[:, -1, :].float()

    def _decode_layer(
        self,
        layer: Any,
        hidden: Any,
        cos: Any,
        sin: Any,
        keys: Any,
        values: Any,
        column: Any,
        prompt_end: Any,
        prompt_lengths: Any,
        mask: Any,
    ) -> Any:
        """One decoder layer for one new token per row; writes its key/value at `column`.

        Attention covers each row's prompt and generated tokens: through the split-key
        kernel on CUDA (reads only those columns), else one masked
        `scaled_dot_product_attention` over the whole buffer (`mask` is then required).
        """
        import torch.nn.functional as functional

        batch = hidden.shape[0]
        scale = layer.self_attn.scaling
        query, key, value = self._rotated_projections(layer, hidden, cos, sin)
        where = column.view(1)
        keys.index_copy_(2, where, key.transpose(1, 2))
        values.index_copy_(2, where, value.transpose(1, 2))
        # Query heads h*group .. h*group+group-1 share key/value head h (repeat_kv order).
        grouped = query.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        if self._split_attention is not None:
            attended = self._split_attention(
                grouped, keys, values, prompt_lengths, prompt_end, column, scale
            )
        else:
            attended = functional.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=mask, scale=scale
            )
        attended = attended.reshape(batch, 1, self.heads * self.head_dim)
        return self._layer_output(layer, hidden, attended)


def _append_call(out: list[Any], function: Callable[[int], Any], argument: int) -> None:
    out.append(function(argument))


def _rotate_half(x: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# -------------------------------------------------------------------------- engines


class _InternVLEngineBase:
    """Shared batching, prompt building and decoding; subclasses load and run the model.

    `generate` is serialised by a lock (one model, one batch at a time). Every request of
    the batch is validated before any compute; a malformed request raises
    `ProcessingError(INVALID_REQUEST)` and fails the whole batch. Any other failure
    during generation raises `ProcessingError(MODEL_FAILED)` with the cause.
    """

    _prefix = "internvl"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = Path(config.model_path)
        self._model: Any = None
        self._tokenizer: Any = None
        self._version = f"{self._prefix}:{self.model_path.name}:not-loaded"
        self._lock = threading.Lock()
        self.device = ""
        self.dtype: Any = None
        self.attn_implementation = ""
        self.tokens_per_tile = 0
        self.image_size = 0
        self._im_end_id = -1
        self._pad_id = -1
        self._context_id = -1
        self.chat_template = self._template(DEFAULT_TEMPLATE)
        self.timings: dict[str, float] = dict.fromkeys(TIMING_STAGES, 0.0)
        # Seconds from the start of the last `generate_token_ids` call until each request's
        # chunk was done (per request, in call order).
        self.last_completion_s: list[float] = []

    def reset_timings(self) -> None:
        """Zero the per-stage seconds accumulated by `generate_token_ids`."""
        self.timings = dict.fromkeys(TIMING_STAGES, 0.0)

    def _sync(self) -> None:
        """Wait for the work queued on the current CUDA stream (no-op on CPU)."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.current_stream(self.device).synchronize()

    @property
    def model_version(self) -> str:
        """Stable id of the loaded weights (see `model_version_id`); `:not-loaded` before."""
        return self._version

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> Any:
        """The loaded model object (None before `load()`)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (None before `load()`)."""
        return self._tokenizer

    def prompt_ids(self, request: PreparedRequest) -> list[int]:
        """The token ids this engine feeds the model for `request` (validates it first)."""
        return self._encode(request)

    def load(self) -> None:
        """Load tokenizer and weights from the local folder; idempotent.

        Raises `ProcessingError(MODEL_NOT_LOADED)` naming the reason (missing folder or
        files, unsupported layout, a chat template that cannot be reproduced, a tokenizer without the InternVL tokens, a
        transformers error while loading).
        """
        if self._model is not None:
            return
        raw_config = read_checkpoint_config(self.model_path)
        self.chat_template = self._template(resolve_chat_template(self.model_path, raw_config))
        self._check_files(raw_config)
        self.device = resolve_device(self.config)
        self.dtype = resolve_dtype(self.config, self.device)
        self.attn_implementation = resolve_attn_implementation(self.config, self.device)
        with coded_failure(ErrorCode.MODEL_NOT_LOADED, f"loading {self.model_path} failed"):
            tokenizer = self._load_tokenizer()
            model = self._load_model(raw_config, tokenizer)
        self._tokenizer = tokenizer
        self._model = model
        self._version = model_version_id(self._prefix, self.model_path)

    def _template(self, template: ChatTemplate) -> ChatTemplate:
        """`template`, with `config.system_message` when one is set."""
        message = self.config.system_message
        return template if message is None else template.with_system_message(message)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(self.model_path),
            local_files_only=True,
            trust_remote_code=self._trust_remote_code_tokenizer(),
        )
        self._adopt_tokenizer(tokenizer)
        return tokenizer

    def _adopt_tokenizer(self, tokenizer: Any) -> None:
        """Check that the InternVL tokens are single tokens; note `<|im_end|>` and pad ids."""
        ids = {}
        for token in (
            IMG_START_TOKEN,
            IMG_END_TOKEN,
            IMG_CONTEXT_TOKEN,
            IM_START_TOKEN,
            IM_END_TOKEN,
        ):
            encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1 or encoded[0] == tokenizer.unk_token_id:
                raise ProcessingError(
                    ErrorCode.MODEL_NOT_LOADED,
                    f"tokenizer in {self.model_path} has no single token for {token}",
                    STAGE,
                )
            ids[token] = encoded[0]
        self._im_end_id = ids[IM_END_TOKEN]
        self._context_id = ids[IMG_CONTEXT_TOKEN]
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else self._im_end_id

    def _trust_remote_code_tokenizer(self) -> bool:
        return False

    def _check_files(self, raw_config: Mapping[str, Any]) -> None:
        """Fail fast, before the slow tokenizer load, when weight files are missing."""
        if not weight_files(self.model_path):
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                f"no weight files (*.safetensors, pytorch_model*.bin) in {self.model_path}",
                STAGE,
            )

    def _load_model(self, raw_config: Mapping[str, Any], tokenizer: Any) -> Any:
        raise NotImplementedError

    def _generate_new_ids(self, input_ids: Any, attention_mask: Any, pixel_values: Any) -> Any:
        """Run the model; return a (batch, new_tokens) tensor of generated ids only."""
        raise NotImplementedError

    # ---------------------------------------------------------------- generation

    def generate(self, batch: Sequence[PreparedRequest]) -> list[str]:
        """One decoded answer per request, in order (special tokens skipped, stripped)."""
        token_ids = self.generate_token_ids(batch)
        if not token_ids:
            return []
        texts = self._tokenizer.batch_decode(token_ids, skip_special_tokens=True)
        return [text.split(IM_END_TOKEN)[0].strip() for text in texts]

    def generate_token_ids(self, batch: Sequence[PreparedRequest]) -> list[list[int]]:
        """Greedy new token ids per request, cut before the first `<|im_end|>`.

        Requests are grouped by prompt length (less padding) into chunks of at most
        `max_batch_size`; results are returned in the order of `batch`.
        """
        if self._model is None:
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED, "engine not loaded: call load() first", STAGE
            )
        if not batch:
            return []
        size = self.config.max_batch_size
        results: list[list[int]] = [[] for _ in batch]
        with self._lock:  # the tokenizer and the model are not safe to share across threads
            started = time.perf_counter()
            encoded = self._encode_all(batch)
            self.timings["tokenize"] += time.perf_counter() - started
            order = sorted(range(len(batch)), key=lambda index: len(encoded[index]))
            chunks = [order[start : start + size] for start in range(0, len(order), size)]
            self.last_completion_s = [0.0] * len(batch)
            for chunk, outputs in zip(
                chunks, self._run_chunks(encoded, batch, chunks), strict=True
            ):
                finished = time.perf_counter() - started
                for index, ids in zip(chunk, outputs, strict=True):
                    results[index] = ids
                    self.last_completion_s[index] = finished
        return results

    def _run_chunks(
        self,
        encoded: list[list[int]],
        batch: Sequence[PreparedRequest],
        chunks: list[list[int]],
    ) -> Iterator[list[list[int]]]:
        """Outputs of each chunk (indices into `batch`), in chunk order, as they finish."""
        for chunk in chunks:
            yield self._run_chunk([encoded[i] for i in chunk], [batch[i] for i in chunk])

    def _encode(self, request: PreparedRequest) -> list[int]:
        """Token ids of one request's full prompt (image tokens expanded)."""
        return self._encode_all([request])[0]

    def _encode_all(self, batch: Sequence[PreparedRequest]) -> list[list[int]]:
        """Token ids of every request's prompt, tokenized in one batched call.

        The text is tokenized with one `<IMG_CONTEXT>` per tile; each is then widened to
        `tokens_per_tile` ids. `<IMG_CONTEXT>` is a special token, split out before the
        text is tokenized, so the ids equal those of the fully expanded prompt (which is
        tokenized instead should the count not add up).
        """
        texts = [self._compact_text(request) for request in batch]
        compact: list[list[int]] = self._tokenizer(texts)["input_ids"]
        context_id = self._context_id
        out: list[list[int]] = []
        for request, ids in zip(batch, compact, strict=True):
            if ids.count(context_id) != sum(request.num_patches):
                full = build_chat_prompt(
                    expand_image_placeholders(
                        request.prompt, request.num_patches, self.tokens_per_tile
                    ),
                    self.chat_template,
                )
                out.append(list(self._tokenizer(full)["input_ids"]))
                continue
            widened: list[int] = []
            for token in ids:
                if token == context_id:
                    widened.extend([context_id] * self.tokens_per_tile)
                else:
                    widened.append(token)
            out.append(widened)
        return out

    def _compact_text(self, request: PreparedRequest) -> str:
        """The chat prompt with one `<IMG_CONTEXT>` per tile; validates the request."""
        text = build_chat_prompt(
            expand_image_placeholders(request.prompt, request.num_patches, 1),
            self.chat_template,
        )
        tiles = sum(request.num_patches)
        pixels = request.pixel_values
        if tiles and pixels is None:
            raise ProcessingError(
                ErrorCode.INVALID_REQUEST,
                f"request {request.request_id}: {tiles} tiles announced but no pixel_values",
                STAGE,
            )
        if pixels is not None and tiles:
            expected = (tiles, 3, self.image_size, self.image_size)
            if tuple(pixels.shape) != expected:
                raise ProcessingError(
                    ErrorCode.INVALID_REQUEST,
                    f"request {request.request_id}: pixel_values shape {tuple(pixels.shape)}, "
                    f"expected {expected}",
                    STAGE,
                )
        return text

    def _run_chunk(
        self, encoded: list[list[int]], requests: list[PreparedRequest]
    ) -> list[list[int]]:
        import torch

        longest = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), longest), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: prompts end at the same column
            input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, longest - len(ids) :] = 1
        tiles = [r.pixel_values for r in requests if r.pixel_values is not None and r.num_patches]
        pixel_values = torch.cat(tiles).to(device=self.device, dtype=self.dtype) if tiles else None
        with coded_failure(ErrorCode.MODEL_FAILED, "generation failed"), torch.inference_mode():
            started = time.perf_counter()
            new_ids = self._generate_new_ids(
                input_ids.to(self.device), attention_mask.to(self.device), pixel_values
            )
            self._sync()
            self.timings["generate"] += time.perf_counter() - started
        return self._cut_outputs(new_ids.tolist())

    def _cut_outputs(self, rows: list[list[int]]) -> list[list[int]]:
        outputs: list[list[int]] = []
        for row in rows:
            ids = row[: self.config.max_new_tokens]
            if self._im_end_id in ids:
                ids = ids[: ids.index(self._im_end_id)]
            outputs.append(ids)
        return outputs

    def _generation_kwargs(self) -> dict[str, Any]:
        extra = {"min_new_tokens": self.config.min_new_tokens} if self.config.min_new_tokens else {}
        return {
            **extra,
            "max_new_tokens": self.config.max_new_tokens,
            "do_sample": False,
            "eos_token_id": self._im_end_id,
            "pad_token_id": self._pad_id,
        }


class NativeInternVLEngine(_InternVLEngineBase):
    """`transformers.InternVLForConditionalGeneration`, batched greedy generation.

    Loads a native checkpoint with `from_pretrained(local_files_only=True)`, or converts an
    original Qwen2-based `InternVLChatModel` checkpoint in memory
    (`convert_original_config` + `convert_original_state_dict`). The image token id is the
    model's own (`config.image_token_id`), and its token string is taken from the tokenizer.
    """

    _prefix = "internvl-native"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.converted_from_original = False
        self._decoder: StaticGreedyDecoder | None = None
        self._feature_cache: FeatureCache | None = None
        self._pinned: Any = None
        self._vision_stream: Any = None
        self._hash_pool: ThreadPoolExecutor | None = None
        self._grammars: GrammarCache | None = None

    def _load_model(self, raw_config: Mapping[str, Any], tokenizer: Any) -> Any:
        from transformers import InternVLForConditionalGeneration

        kind = checkpoint_kind(raw_config)
        common: dict[str, Any] = {
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "output_loading_info": True,
        }
        loaded: Any
        if kind == "native":
            loaded = InternVLForConditionalGeneration.from_pretrained(
                str(self.model_path), local_files_only=True, **common
            )
        else:
            image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
            native_config = convert_original_config(raw_config, image_token_id)
            state = convert_original_state_dict(load_state_dict_files(self.model_path))
            loaded = InternVLForConditionalGeneration.from_pretrained(
                None, config=native_config, state_dict=state, **common
            )
            self.converted_from_original = True
        model, info = loaded
        problems = {
            name: sorted(keys)[:5]
            for name, keys in info.items()
            if name in ("missing_keys", "unexpected_keys", "mismatched_keys") and keys
        }
        if problems:
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                f"weights of {self.model_path} do not fit the native model: {problems}",
                STAGE,
            )
        return self._adopt_model(model.to(self.device).eval(), tokenizer)

    def _adopt_model(self, model: Any, tokenizer: Any) -> Any:
        """Check the image token, read the tile geometry, set up the static decode path."""
        context_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
        if context_token != IMG_CONTEXT_TOKEN:
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                f"model image_token_id {model.config.image_token_id} is {context_token!r} in the "
                f"tokenizer, expected {IMG_CONTEXT_TOKEN}",
                STAGE,
            )
        vision = model.config.vision_config
        self.image_size = int(vision.image_size[0])
        grid = self.image_size // int(vision.patch_size[0])
        self.tokens_per_tile = round(grid**2 * model.config.downsample_ratio**2)
        self._decoder = None
        self._feature_cache = None
        if self.config.decode in ("auto", "static"):
            self._decoder = StaticGreedyDecoder(
                model,
                eos_id=self._im_end_id,
                max_new_tokens=self.config.max_new_tokens,
                min_new_tokens=self.config.min_new_tokens,
                length_bucket=self.config.cache_length_bucket,
                cuda_graphs=self.config.cuda_graphs and self.device.startswith("cuda"),
                compile_step=self.config.compile_decode and self.device.startswith("cuda"),
                compile_prefill=self.config.compile_prefill and self.device.startswith("cuda"),
                split_attention=self._split_attention_wanted(model),
                attention_splits=self.config.attention_splits,
            )
            if self.config.feature_cache_mb and self.config.feature_cache_images:
                self._feature_cache = FeatureCache(self.config.feature_cache_mb * 2**20)
            if self.config.compile_vision and self.device.startswith("cuda"):
                embeddings = model.model.vision_tower.embeddings.patch_embeddings
                patch_projection_as_matmul(embeddings.projection)
                for layer in model.model.vision_tower.encoder.layer:
                    layer.compile(dynamic=False)
        return model

    def _split_attention_wanted(self, model: Any) -> bool:
        """Whether the decode steps use the split-key kernel (see `decode_attention`).

        "split" that cannot run here is a start-up error (MODEL_NOT_LOADED); "auto"
        then falls back to SDPA.
        """
        choice = self.config.decode_attention
        if choice == "sdpa":
            return False
        heads, kv_heads, head_dim = attention_geometry(model.config.text_config)
        problem = None
        if not self.device.startswith("cuda"):
            problem = f"needs a CUDA device, not {self.device}"
        elif importlib.util.find_spec("triton") is None:
            problem = "needs the triton package"
        elif not SplitKeyAttention.supports(head_dim, heads // kv_heads):
            problem = (
                f"does not support head_dim {head_dim} with {heads // kv_heads} query heads "
                "per key/value head"
            )
        if problem is not None and choice == "split":
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED, f"decode_attention='split' {problem}", STAGE
            )
        return problem is None

    @classmethod
    def from_model(cls, config: EngineConfig, model: Any, tokenizer: Any) -> NativeInternVLEngine:
        """An engine around an in-memory model and tokenizer (benchmarks, tests).

        `config.model_path` only names the engine; the model's own device and dtype are
        used. Several engines may share one model (e.g. to compare decode paths).
        """
        engine = cls(config)
        parameter = next(model.parameters())
        engine.device = str(parameter.device)
        engine.dtype = parameter.dtype
        engine.attn_implementation = str(model.config._attn_implementation)
        engine._adopt_tokenizer(tokenizer)
        engine._model = engine._adopt_model(model.eval(), tokenizer)
        engine._tokenizer = tokenizer
        engine._version = f"{cls._prefix}:{engine.model_path.name}:in-memory"
        return engine

    @property
    def feature_cache(self) -> FeatureCache | None:
        """The image-feature cache of the static path (None when disabled)."""
        return self._feature_cache

    def _run_chunks(
        self,
        encoded: list[list[int]],
        batch: Sequence[PreparedRequest],
        chunks: list[list[int]],
    ) -> Iterator[list[list[int]]]:
        """The static path, pipelined: the next chunk's images are encoded while this one decodes.

        Per chunk: wait for its image features, prefill, then queue the next chunk's vision
        work (hashing and pinned copies on the host, the vision tower on a second CUDA
        stream) before decoding, so the compute-bound vision tower fills the GPU while the
        latency-bound decode steps run.
        """
        if self._decoder is None:
            yield from super()._run_chunks(encoded, batch, chunks)
            return
        import torch

        def wrapped(step: Any, *args: Any) -> Any:
            with coded_failure(ErrorCode.MODEL_FAILED, "generation failed"), torch.inference_mode():
                return step(*args)

        def requests_of(number: int) -> list[PreparedRequest]:
            return [batch[i] for i in chunks[number]]

        def start_vision(number: int) -> tuple[list[list[Any]], Any]:
            began = time.perf_counter()
            queued: tuple[list[list[Any]], Any] = wrapped(self._start_vision, requests_of(number))
            spent = time.perf_counter() - began  # hashing, copies, queueing (all of it on CPU)
            self.timings["vision"] += spent
            self.timings["generate"] += spent
            return queued

        pending = start_vision(0)
        for number, chunk in enumerate(chunks):
            started = time.perf_counter()
            features, ready = pending
            if ready is not None:
                ready.synchronize()  # exposed (not overlapped) vision time
            vision_done = time.perf_counter()
            self.timings["vision"] += vision_done - started
            rows = [encoded[i] for i in chunk]
            constraint = self._constraint(requests_of(number))
            session, first = wrapped(self._prefill, rows, features, constraint)
            self._sync()
            prefill_done = time.perf_counter()
            self.timings["prefill"] += prefill_done - vision_done
            self.timings["generate"] += prefill_done - started
            upcoming: list[tuple[list[list[Any]], Any]] = []
            queue_next = None
            if number + 1 < len(chunks):
                queue_next = functools.partial(_append_call, upcoming, start_vision, number + 1)
            vision_before = self.timings["vision"]
            decode_started = time.perf_counter()
            if constraint is not None:
                tokens = wrapped(
                    self._decoder.decode_constrained, session, first, constraint, queue_next
                )
            else:
                tokens = wrapped(self._decoder.decode, session, first, queue_next)
            # The next batch's host-side vision work ran inside; it is counted as vision.
            spent = time.perf_counter() - decode_started
            spent -= self.timings["vision"] - vision_before
            self.timings["decode"] += spent
            self.timings["generate"] += spent
            if upcoming:
                pending = upcoming[0]
            del features
            yield self._cut_outputs(tokens)

    def _start_vision(self, requests: list[PreparedRequest]) -> tuple[list[list[Any]], Any]:
        """Queue the image features of `requests`; returns (features, CUDA event or None)."""
        if not self.device.startswith("cuda"):
            return self._image_features(requests), None
        import torch

        if self._vision_stream is None:
            self._vision_stream = torch.cuda.Stream(self.device)
        stream = self._vision_stream
        # The vision stream may reuse memory the main stream freed: order it after it.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            features = self._image_features(requests)
            ready = torch.cuda.Event()
            ready.record(stream)
        return features, ready

    @property
    def grammars(self) -> GrammarCache | None:
        """The compiled answer grammars (None until a constrained request was decoded)."""
        return self._grammars

    def _constraint(self, requests: list[PreparedRequest]) -> ConstrainedRows | None:
        """Matchers for a chunk's requests that carry an answer schema (None: all free)."""
        schemas = [r.answer_schema for r in requests]
        if not self.config.constrained_decoding or all(s is None for s in schemas):
            return None
        if self._grammars is None:
            self._grammars = GrammarCache(
                self._tokenizer,
                vocab_size=int(self._model.lm_head.out_features),
                stop_id=self._im_end_id,
                threads=self.config.grammar_threads,
            )
        return ConstrainedRows(self._grammars, schemas)

    def _prefill(
        self,
        encoded: list[list[int]],
        features: list[list[Any]],
        constraint: ConstrainedRows | None = None,
    ) -> tuple[Any, Any]:
        """Prefill every row of a chunk (sub-batches); returns (session, first tokens).

        With `constraint`, each row's first token is drawn inside its grammar."""
        import torch

        assert self._decoder is not None
        if constraint is not None:
            constraint.fill()
        longest = max(len(ids) for ids in encoded)
        session = self._decoder.session(len(encoded), longest)
        first_tokens = []
        step = self.config.prefill_batch_size
        for begin in range(0, len(encoded), step):
            rows = encoded[begin : begin + step]
            width = max(len(ids) for ids in rows)  # rows come sorted by length: little padding
            input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
            for row, ids in enumerate(rows):  # right padding: see StaticGreedyDecoder
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths = torch.tensor([len(ids) for ids in rows], dtype=torch.long)
            row_features = [f for feats in features[begin : begin + step] for f in feats]
            image_features = torch.cat(row_features) if row_features else None
            first_tokens.append(
                self._decoder.prefill(
                    session,
                    begin,
                    input_ids.to(self.device, non_blocking=True),
                    lengths.to(self.device, non_blocking=True),
                    image_features,
                    image_tokens=int((input_ids == self._decoder.image_token_id).sum()),
                    constraint=constraint,
                )
            )
        return session, torch.cat(first_tokens)

    def _image_features(self, requests: list[PreparedRequest]) -> list[list[Any]]:
        """Projected features per request, one (tiles, tokens, hidden) tensor per image.

        The first `feature_cache_images` images of a request are looked up in the feature
        cache by content (sha256 of their tiles); every other tile goes through the vision
        tower in batches of `vision_batch_tiles`, moved to the device from pinned memory.
        """
        cache = self._feature_cache
        candidates = self.config.feature_cache_images if cache is not None else 0
        # "cached": a feature tensor; "todo": an index into `todo`.
        plan: list[list[tuple[str, Any]]] = []  # per image: ("cached", tensor) | ("todo", index)
        todo: list[Any] = []
        todo_keys: list[str | None] = []
        pending: dict[str, int] = {}
        split = [
            (
                list(request.pixel_values.split(list(request.num_patches)))
                if request.pixel_values is not None and request.num_patches
                else []
            )
            for request in requests
        ]
        hashed = [tiles for images in split for tiles in images[:candidates]]
        if len(hashed) > 1:  # sha256 releases the GIL: hash the candidates in parallel
            if self._hash_pool is None:
                self._hash_pool = ThreadPoolExecutor(8, thread_name_prefix="feature-key")
            keys = iter(list(self._hash_pool.map(content_key, hashed)))
        else:
            keys = iter([content_key(tiles) for tiles in hashed])
        for images_of_request in split:
            images: list[tuple[str, Any]] = []
            if images_of_request:
                for number, tiles in enumerate(images_of_request):
                    key = next(keys) if number < candidates else None
                    hit = cache.get(key) if cache is not None and key is not None else None
                    if hit is not None:
                        images.append(("cached", hit))
                    elif key is not None and key in pending:
                        images.append(("todo", pending[key]))
                    else:
                        if key is not None:
                            pending[key] = len(todo)
                        images.append(("todo", len(todo)))
                        todo.append(tiles)
                        todo_keys.append(key)
            plan.append(images)
        computed = self._encode_images(todo)
        if cache is not None:
            for key, value in zip(todo_keys, computed, strict=True):
                if key is not None:
                    cache.put(key, value)
        return [
            [value if kind == "cached" else computed[value] for kind, value in images]
            for images in plan
        ]

    def _encode_images(self, images: list[Any]) -> list[Any]:
        """Vision tower + projector over all tiles of `images`, in fixed-size tile batches.

        Each batch is copied into pinned host memory, moved to the device and converted
        to the model's dtype on its own, and its vision work queued before the next
        batch is copied: the GPU starts after one batch of host copies, not all of them,
        and the device holds one batch of float32 pixels at a time.
        """
        import torch

        if not images:
            return []
        counts = [int(image.shape[0]) for image in images]
        tiles = [tile for image in images for tile in image.unbind(0)]
        host = self._host_buffer(len(tiles), tuple(images[0].shape[1:]))
        model = self._model.model
        config = self._model.config
        step = self.config.vision_batch_tiles
        parts = []
        for begin in range(0, len(tiles), step):
            started = time.perf_counter()
            batch = host[begin : begin + step]
            torch.stack(tiles[begin : begin + step], out=batch)
            pixels = batch.to(self.device, non_blocking=True).to(self.dtype)
            self.timings["transfer"] += time.perf_counter() - started
            parts.append(
                model.get_image_features(
                    pixel_values=pixels,
                    vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy,
                    return_dict=True,
                ).pooler_output
            )
        features = torch.cat(parts) if len(parts) > 1 else parts[0]
        return list(features.split(counts))

    def _host_buffer(self, tiles: int, tile_shape: tuple[int, ...]) -> Any:
        """A reusable host buffer for the tiles (pinned when the model is on CUDA)."""
        import torch

        buffer = self._pinned
        if buffer is None or buffer.shape[0] < tiles or tuple(buffer.shape[1:]) != tile_shape:
            buffer = torch.empty(
                (max(tiles, 2 * (buffer.shape[0] if buffer is not None else 0)), *tile_shape),
                dtype=torch.float32,
                pin_memory=self.device.startswith("cuda"),
            )
            self._pinned = buffer
        return buffer[:tiles]

    def _generate_new_ids(self, input_ids: Any, attention_mask: Any, pixel_values: Any) -> Any:
        output = self._model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            **self._generation_kwargs(),
        )
        return output[:, input_ids.shape[1] :]


class RemoteCodeInternVLEngine(_InternVLEngineBase):
    """The checkpoint's own `InternVLChatModel` code (`trust_remote_code=True`, local only).

    Builds the queries as the original `model.chat` does (placeholders expanded one image
    at a time, the checkpoint's chat template), pads on the left like `batch_chat`, sets
    `model.img_context_token_id` and calls `model.generate(pixel_values, input_ids,
    attention_mask, ...)`, which returns only the new tokens. `batch_chat` itself is not
    called: it expands only the first `<image>` of each question, and our requests carry
    several images.

    The original files were written for transformers 4; `processors.remote_code` builds
    their config so that they load on transformers 5 without editing them. Any other
    failure of the checkpoint's code is reported as `ProcessingError(MODEL_NOT_LOADED)` by
    `load()`.
    """

    _prefix = "internvl-remote-code"

    def _trust_remote_code_tokenizer(self) -> bool:
        return True

    def _check_files(self, raw_config: Mapping[str, Any]) -> None:
        super()._check_files(raw_config)
        if not has_remote_code(self.model_path, raw_config):
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                f"{self.model_path} has no modeling code named by config.json auto_map",
                STAGE,
            )

    def _load_model(self, raw_config: Mapping[str, Any], tokenizer: Any) -> Any:
        from transformers import AutoModel

        from processors.remote_code import load_remote_config

        # The config is built here so the original code loads on transformers 5 (see
        # processors.remote_code).
        config = load_remote_config(self.model_path, raw_config, self.attn_implementation)
        model = AutoModel.from_pretrained(
            str(self.model_path),
            config=config,
            local_files_only=True,
            trust_remote_code=True,
            dtype=self.dtype,
            use_flash_attn=self.attn_implementation == "flash_attention_2",
        )
        model = model.to(self.device).eval()
        model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        vision = raw_config.get("vision_config") or {}
        self.image_size = int(raw_config.get("force_image_size") or vision.get("image_size", 448))
        tokens = getattr(model, "num_image_token", None)
        if tokens is None:
            grid = self.image_size // int(vision.get("patch_size", 14))
            tokens = round(grid**2 * float(raw_config.get("downsample_ratio", 0.5)) ** 2)
        self.tokens_per_tile = int(tokens)
        return model

    def _generate_new_ids(self, input_ids: Any, attention_mask: Any, pixel_values: Any) -> Any:
        return self._model.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **self._generation_kwargs(),
        )


def load_engine(config: EngineConfig) -> InferenceEngine:
    """`create_engine(config)`, loaded; raises `ProcessingError(MODEL_NOT_LOADED)` on failure."""
    engine = create_engine(config)
    engine.load()
    return engine


def create_engine(config: EngineConfig) -> NativeInternVLEngine | RemoteCodeInternVLEngine:
    """Detect the checkpoint layout from config.json and build the matching engine, unloaded.

    - native checkpoint: `NativeInternVLEngine` (format "auto" or "native").
    - original checkpoint, Qwen2 language model: `NativeInternVLEngine` converting the
      weights (format "auto" or "native"), or `RemoteCodeInternVLEngine` with
      format "remote-code".
    - original checkpoint that cannot be converted: `RemoteCodeInternVLEngine` when the
      folder holds the modeling code (format "auto" or "remote-code").

    Raises `ProcessingError(MODEL_NOT_LOADED)` naming the reason when no engine fits.
    """
    model_path = Path(config.model_path)
    raw_config = read_checkpoint_config(model_path)
    kind = checkpoint_kind(raw_config)
    engine: NativeInternVLEngine | RemoteCodeInternVLEngine
    if config.format == "remote-code":
        if kind == "native":
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                f"{model_path} is a native checkpoint; it has no remote code to run",
                STAGE,
            )
        engine = RemoteCodeInternVLEngine(config)
    elif kind == "native" or is_convertible(raw_config):
        engine = NativeInternVLEngine(config)
    elif config.format == "auto" and has_remote_code(model_path, raw_config):
        engine = RemoteCodeInternVLEngine(config)
    else:
        raise ProcessingError(
            ErrorCode.MODEL_NOT_LOADED,
            f"{model_path}: original checkpoint that cannot be converted to the native "
            "layout" + ("" if config.format == "native" else " and carries no modeling code"),
            STAGE,
        )
    return engine
