"""What both InternVL engines share: loading, validation, prompt ids, batching and decoding.

Subclasses load and run the model (`processors.internvl.engines`). Weights are loaded in
`load()`, never in `__init__`; only local files are read (`local_files_only=True`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from processors.chat_templates import DEFAULT_TEMPLATE, ChatTemplate, resolve_chat_template
from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl.chat import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    build_chat_prompt,
    expand_image_placeholders,
)
from processors.internvl.checkpoint import model_version_id, read_checkpoint_config, weight_files
from processors.internvl.config import (
    STAGE,
    TIMING_STAGES,
    EngineConfig,
    coded_failure,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
)


class InternVLEngineBase:
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
        """Whether `load()` (or `from_model`) has set up a model."""
        return self._model is not None

    @property
    def model(self) -> Any:
        """The loaded model object (None before `load()`)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (None before `load()`)."""
        return self._tokenizer

    @property
    def lock(self) -> threading.Lock:
        """Held while the model runs: the tokenizer and the model are not shared across threads."""
        return self._lock

    @property
    def im_end_id(self) -> int:
        """The `<|im_end|>` id, where every answer stops (-1 before `load()`)."""
        return self._im_end_id

    @property
    def pad_id(self) -> int:
        """The padding id of batched prompts (the tokenizer's, else `<|im_end|>`)."""
        return self._pad_id

    @property
    def context_id(self) -> int:
        """The `<IMG_CONTEXT>` id, the placeholder of each image feature token."""
        return self._context_id

    def prompt_ids(self, request: PreparedRequest) -> list[int]:
        """The token ids this engine feeds the model for `request` (validates it first)."""
        return self._encode(request)

    def encode_prompts(self, batch: Sequence[PreparedRequest]) -> list[list[int]]:
        """`prompt_ids` of every request, tokenized in one batched call.

        Raises:
            ProcessingError: INVALID_REQUEST for a malformed request (placeholders, tiles).
        """
        return self._encode_all(batch)

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
