"""How an InternVL engine is configured, and the error stage all its failures carry.

`EngineConfig` is validated on construction; `resolve_device`, `resolve_dtype` and
`resolve_attn_implementation` turn its "auto" values into what torch and transformers
take. Nothing here imports torch at module import time.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from processors.errors import ErrorCode, ProcessingError

STAGE = "model"
"""The `ProcessingError.stage` of every failure raised by the InternVL engines."""


@contextmanager
def coded_failure(code: ErrorCode, what: str) -> Iterator[None]:
    """Let `ProcessingError` through; turn any other exception into `code`, prefixed by `what`.

    Raises:
        ProcessingError: the original one unchanged, or `code` with the cause's type and
            message (at most 2000 characters), chained to the cause.
    """
    try:
        yield
    except ProcessingError:
        raise
    except Exception as exc:
        raise ProcessingError(code, f"{what}: {type(exc).__name__}: {exc}"[:2000], STAGE) from exc


DeviceName = str
DtypeName = Literal["auto", "bfloat16", "float16", "float32"]
AttnName = Literal["auto", "sdpa", "eager", "flash_attention_2"]
FormatName = Literal["auto", "native", "remote-code"]
DecodeName = Literal["auto", "static", "generate"]
DecodeAttentionName = Literal["auto", "split", "sdpa"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "decode": ("auto", "static", "generate"),
    "decode_attention": ("auto", "split", "sdpa"),
    "dtype": ("auto", "bfloat16", "float16", "float32"),
    "attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "format": ("auto", "native", "remote-code"),
}
_POSITIVE = (
    "prefill_batch_size",
    "vision_batch_tiles",
    "cache_length_bucket",
    "grammar_threads",
    "max_batch_size",
)
_NON_NEGATIVE = ("feature_cache_mb", "feature_cache_images", "attention_splits")
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
            activations and layer scales around the matrix products; one compilation with a
            dynamic tile count is shared by the identical layers) and run the patch
            embedding as a matrix product (`patch_projection_as_matmul`). Off by default:
            it costs compilations at load (a warm-up on one and two blank tiles) and
            changes the model object in place.
        compile_decode: on CUDA, `torch.compile` the static path's decode layer (fusing its
            many small element-wise kernels; dynamic shapes, so one compilation serves every
            layer, batch size and cache length) before the step is captured as a CUDA graph. Off by
            default (the first batch pays the compilation).
        compile_prefill: on CUDA, `torch.compile` the static path's prefill layer (norms,
            rotary embedding, residuals and the gated MLP fused around the matrix products
            and attention; dynamic shapes, one compilation for every layer, row count and
            prompt length). Off by default (the first batch pays the compilation).
        fuse_projections: each language-model layer runs its query/key/value projections
            as one matrix product and its gate/up projections as another
            (`processors.internvl.fused`; the modules' weights become views of the fused
            ones, so memory is unchanged). Fewer kernels per decode step: 12 % off a step
            at 16-64 rows on an H200 (`bench/results/profile-fused-h200.json`).
        decode_attention: attention of the static path's decode steps. "split" reads only
            each row's prompt and generated columns of the KV cache, split across
            `attention_splits` programs per row and key/value head (Triton; CUDA only);
            "sdpa" is one masked `scaled_dot_product_attention` over the whole cache;
            "auto" is "split" on CUDA when Triton is installed, else "sdpa".
        attention_splits: programs per (row, key/value head) of the "split" attention;
            0 (the default) picks them per batch size, so small batches still fill the
            GPU (`processors.internvl.decode_attention.auto_splits`).
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
    fuse_projections: bool = True
    decode_attention: DecodeAttentionName = "auto"
    attention_splits: int = 0
    constrained_decoding: bool = True
    grammar_threads: int = 4

    def __post_init__(self) -> None:
        """Check every field's domain; raises `ValueError` naming the first bad one."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}"
            )
        for name in ("decode", "decode_attention"):
            self._check_choice(name)
        for names, least in ((_POSITIVE, 1), (_NON_NEGATIVE, 0)):
            for name in names:
                if getattr(self, name) < least:
                    raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        for name in ("dtype", "attn_implementation", "format"):
            self._check_choice(name)
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def _check_choice(self, name: str) -> None:
        """Raise `ValueError` when the field `name` is not one of its allowed values."""
        value = getattr(self, name)
        if value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")


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
