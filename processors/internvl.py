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
tiles) + `</img>`, inside the InternVL 2.5 chat template (ChatML with the InternVL
system message), exactly as the original `model.chat`/`batch_chat` build it. Generation
is greedy (`do_sample=False`), stops at `<|im_end|>`, and decodes only the new tokens.

Nothing here reads the environment or touches CUDA at import time; weights are loaded
in `load()`, never in `__init__`. Only local files are read (`local_files_only=True`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from processors.errors import ErrorCode, ProcessingError
from processors.inference import IMAGE_PLACEHOLDER, InferenceEngine, PreparedRequest

STAGE = "model"

INTERNVL25_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多个合作单位"
    "联合开发的多模态大语言模型。"
)
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
CheckpointKind = Literal["native", "original"]

_DTYPES = ("auto", "bfloat16", "float16", "float32")
_ATTNS = ("auto", "sdpa", "eager", "flash_attention_2")
_FORMATS = ("auto", "native", "remote-code")
_CONVERTIBLE_LLMS = ("Qwen2ForCausalLM",)


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
        system_message: system message of the chat template; the default is the one the
            original `internvl2_5` template (and so the fine-tuning) used.

    Raises `ValueError` on construction when a value is out of its domain.
    """

    model_path: Path | str
    device: DeviceName = "auto"
    dtype: DtypeName = "auto"
    max_new_tokens: int = 2000
    attn_implementation: AttnName = "auto"
    max_batch_size: int = 32
    format: FormatName = "auto"
    system_message: str = INTERNVL25_SYSTEM_MESSAGE

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
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


def build_chat_prompt(question: str, system_message: str = INTERNVL25_SYSTEM_MESSAGE) -> str:
    """The `internvl2_5` conversation template, as `get_conv_template(...).get_prompt()`.

    One user turn followed by the open assistant turn:
    `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n`
    `<|im_start|>assistant\\n`.
    """
    return (
        f"{IM_START_TOKEN}system\n{system_message}{IM_END_TOKEN}\n"
        f"{IM_START_TOKEN}user\n{question}{IM_END_TOKEN}\n"
        f"{IM_START_TOKEN}assistant\n"
    )


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

    @property
    def model_version(self) -> str:
        """Stable id of the loaded weights (see `model_version_id`); `:not-loaded` before."""
        return self._version

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load tokenizer and weights from the local folder; idempotent.

        Raises `ProcessingError(MODEL_NOT_LOADED)` naming the reason (missing folder or
        files, unsupported layout, a tokenizer without the InternVL tokens, a
        transformers error while loading).
        """
        if self._model is not None:
            return
        raw_config = read_checkpoint_config(self.model_path)
        self._check_files(raw_config)
        self.device = resolve_device(self.config)
        self.dtype = resolve_dtype(self.config, self.device)
        self.attn_implementation = resolve_attn_implementation(self.config, self.device)
        try:
            tokenizer = self._load_tokenizer()
            model = self._load_model(raw_config, tokenizer)
        except ProcessingError:
            raise
        except Exception as exc:
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                f"loading {self.model_path} failed: {type(exc).__name__}: {exc}"[:2000],
                STAGE,
            ) from exc
        self._tokenizer = tokenizer
        self._model = model
        self._version = model_version_id(self._prefix, self.model_path)

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            str(self.model_path),
            local_files_only=True,
            trust_remote_code=self._trust_remote_code_tokenizer(),
        )
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
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else self._im_end_id
        return tokenizer

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
            encoded = [self._encode(request) for request in batch]
            order = sorted(range(len(batch)), key=lambda index: len(encoded[index]))
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                outputs = self._run_chunk([encoded[i] for i in chunk], [batch[i] for i in chunk])
                for index, ids in zip(chunk, outputs, strict=True):
                    results[index] = ids
        return results

    def _encode(self, request: PreparedRequest) -> list[int]:
        text = build_chat_prompt(
            expand_image_placeholders(request.prompt, request.num_patches, self.tokens_per_tile),
            self.config.system_message,
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
        ids: list[int] = self._tokenizer(text)["input_ids"]
        return ids

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
        try:
            with torch.inference_mode():
                new_ids = self._generate_new_ids(
                    input_ids.to(self.device), attention_mask.to(self.device), pixel_values
                )
        except ProcessingError:
            raise
        except Exception as exc:
            raise ProcessingError(
                ErrorCode.MODEL_FAILED,
                f"generation failed: {type(exc).__name__}: {exc}"[:2000],
                STAGE,
            ) from exc
        outputs: list[list[int]] = []
        for row in new_ids.tolist():
            ids = row[: self.config.max_new_tokens]
            if self._im_end_id in ids:
                ids = ids[: ids.index(self._im_end_id)]
            outputs.append(ids)
        return outputs

    def _generation_kwargs(self) -> dict[str, Any]:
        return {
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
        model = model.to(self.device).eval()
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
        return model

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
    at a time, `internvl2_5` template), pads on the left like `batch_chat`, sets
    `model.img_context_token_id` and calls `model.generate(pixel_values, input_ids,
    attention_mask, ...)`, which returns only the new tokens. `batch_chat` itself is not
    called: it expands only the first `<image>` of each question, and our requests carry
    several images.

    Whether the checkpoint's code runs under the installed transformers (5.x) depends on
    that code; a failure is reported as `ProcessingError(MODEL_NOT_LOADED)` by `load()`.
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

        model = AutoModel.from_pretrained(
            str(self.model_path),
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
