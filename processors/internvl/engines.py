"""InternVL engines: the Hugging Face native model and the original remote-code format.

`NativeInternVLEngine` serves both checkpoint layouts (`processors.internvl.checkpoint`):
an original checkpoint whose language model is Qwen2 is converted to the native layout in
memory while loading (`processors.internvl.convert`), so the fast, batched native code
path runs the fine-tuned weights without any remote code. `RemoteCodeInternVLEngine` runs
the checkpoint's own code (`trust_remote_code=True`, local files only), building the
inputs exactly as the original `model.chat` does; it is the fallback for original
checkpoints that cannot be converted. `create_engine` picks one from config.json.

Both follow the prompt convention of `processors.internvl.chat`. Generation is greedy
(`do_sample=False`), stops at `<|im_end|>`, and decodes only the new tokens.

The native engine's default decode path (`EngineConfig.decode="static"`) does not call
`generate`: the vision tower runs over all tiles of a batch in fixed-size tile batches
(`processors.internvl.vision`: pinned host memory, a content-addressed, memory-bounded
cache of the vendor images' features), the language model prefills in sub-batches of
right-padded, length-sorted prompts, and `StaticGreedyDecoder`
(`processors.internvl.decoder`) decodes greedily over a static KV cache whose step is
replayed as a CUDA graph (optionally `torch.compile`d first). When one call holds several
batches, the next batch's vision work is queued while the current one decodes. Greedy ids
equal `generate`'s in float32 (tests on CPU; checked on an H100 at the full 1B shape); in
bfloat16 the different kernel choice makes long answers drift, as batched `generate`
does. `decode="generate"` keeps the original path.

Nothing here reads the environment or touches CUDA at import time; weights are loaded
in `load()`, never in `__init__`.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from processors.constrained import ConstrainedRows, GrammarCache
from processors.errors import ErrorCode, ProcessingError
from processors.inference import InferenceEngine, PreparedRequest
from processors.internvl.base import InternVLEngineBase
from processors.internvl.chat import IMG_CONTEXT_TOKEN
from processors.internvl.checkpoint import (
    checkpoint_kind,
    has_remote_code,
    is_convertible,
    read_checkpoint_config,
)
from processors.internvl.config import STAGE, EngineConfig, coded_failure
from processors.internvl.convert import (
    convert_original_config,
    convert_original_state_dict,
    load_state_dict_files,
)
from processors.internvl.decode_attention import SplitKeyAttention
from processors.internvl.decoder import StaticGreedyDecoder, attention_geometry
from processors.internvl.vision import (
    FeatureCache,
    StagedImages,
    VisionEncoder,
    patch_projection_as_matmul,
)


def _append_call(out: list[Any], function: Callable[[int], Any], argument: int) -> None:
    """Append `function(argument)` to `out` (a deferred call whose result is kept)."""
    out.append(function(argument))


class NativeInternVLEngine(InternVLEngineBase):
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
        self._vision: VisionEncoder | None = None
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
        cache = None
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
                fuse_projections=self.config.fuse_projections,
            )
            if self.config.feature_cache_mb and self.config.feature_cache_images:
                cache = FeatureCache(self.config.feature_cache_mb * 2**20)
            if self.config.compile_vision and self.device.startswith("cuda"):
                embeddings = model.model.vision_tower.embeddings.patch_embeddings
                patch_projection_as_matmul(embeddings.projection)
                for layer in model.model.vision_tower.encoder.layer:
                    # Dynamic tile counts: the slot engine's vision groups vary in size, and
                    # static shapes recompiled for each new count (then ran eagerly past
                    # dynamo's limit); dynamic was as fast at 7 to 112 tiles on an H200.
                    layer.compile(dynamic=True)
        self._vision = VisionEncoder(
            model,
            device=self.device,
            dtype=self.dtype,
            batch_tiles=self.config.vision_batch_tiles,
            cache=cache,
            cache_images=self.config.feature_cache_images,
        )
        if self.config.compile_vision and self.device.startswith("cuda"):
            # Compile now, not at the first courier's request (seconds per compilation).
            self._vision.warm_up(self.image_size, self.timings)
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
        # transformers exposes the resolved implementation only as this attribute.
        engine.attn_implementation = str(model.config._attn_implementation)  # noqa: SLF001
        engine._adopt_tokenizer(tokenizer)
        engine._model = engine._adopt_model(model.eval(), tokenizer)
        engine._tokenizer = tokenizer
        engine._version = f"{cls._prefix}:{engine.model_path.name}:in-memory"
        return engine

    @property
    def feature_cache(self) -> FeatureCache | None:
        """The image-feature cache of the static path (None when disabled)."""
        return self._vision.cache if self._vision is not None else None

    @property
    def decoder(self) -> StaticGreedyDecoder | None:
        """The static-cache decoder (None on the "generate" path or before loading)."""
        return self._decoder

    def image_features(
        self,
        requests: Sequence[PreparedRequest],
        staged: Sequence[StagedImages] | None = None,
    ) -> list[list[Any]]:
        """Projected features per request, one (tiles, tokens, hidden) tensor per image.

        Cached vendor images are reused (see `VisionEncoder.image_features`); `staged`
        holds `stage_images` of each request when it was staged ahead. Raises
        `ProcessingError(MODEL_NOT_LOADED)` before `load()`; model failures propagate.
        """
        if staged is not None:
            return self._vision_encoder().image_features(list(requests), self.timings, staged)
        return self._image_features(list(requests))

    def stage_images(self, request: PreparedRequest) -> StagedImages:
        """The request's tiles in pinned memory and their cache keys (`VisionEncoder.stage`).

        Thread-safe. Raises `ProcessingError(MODEL_NOT_LOADED)` before `load()`.
        """
        return self._vision_encoder().stage(request)

    def encode_images(self, images: Sequence[Any]) -> list[Any]:
        """Vision tower + projector over the tiles of each image (no cache; benchmarks).

        Raises `ProcessingError(MODEL_NOT_LOADED)` before `load()`; model failures propagate.
        """
        return self._vision_encoder().encode_images(list(images), self.timings)

    def _vision_encoder(self) -> VisionEncoder:
        if self._vision is None:
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED, "engine not loaded: call load() first", STAGE
            )
        return self._vision

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
        return self._vision_encoder().start(requests, self.timings)

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

        With `constraint`, each row's first token is drawn inside its grammar.
        """
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
        """Projected features per request (see `VisionEncoder.image_features`)."""
        return self._vision_encoder().image_features(requests, self.timings)

    def _generate_new_ids(self, input_ids: Any, attention_mask: Any, pixel_values: Any) -> Any:
        output = self._model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            **self._generation_kwargs(),
        )
        return output[:, input_ids.shape[1] :]


class RemoteCodeInternVLEngine(InternVLEngineBase):
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
