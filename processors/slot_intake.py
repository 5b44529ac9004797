"""A request's way into the slot scheduler: its host work, then its images' features.

`prepare_work` (any thread) tokenizes the prompt and stages the tiles
(`NativeInternVLEngine.stage_images`: converted to the model's dtype, pinned on CUDA,
vendor images hashed), a few milliseconds per request that the slot engine keeps off the
thread that feeds the GPU (`processors.slot_engine`). It reads the engine's settings and
tokenizer only. `encode_works` (the scheduler's thread) queues the vision tower over the
staged tiles of a group of admitted requests.
"""

from __future__ import annotations

import time

from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import NativeInternVLEngine, coded_failure
from processors.slot_records import STAGE, JsonObjectEnd, SlotEngineConfig, SlotWork


def prepare_work(
    engine: NativeInternVLEngine,
    config: SlotEngineConfig,
    request: PreparedRequest,
    *,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    submitted: float | None = None,
) -> SlotWork:
    """The scheduler's state of `request`, tokenized and staged, not yet admitted.

    Raises `ValueError` for token limits out of order and `ProcessingError(INVALID_REQUEST)`
    for a malformed request (placeholders, pixel shapes).
    """
    max_new = max_new_tokens or engine.config.max_new_tokens
    min_new = engine.config.min_new_tokens if min_new_tokens is None else min_new_tokens
    if not 0 <= min_new <= max_new:
        raise ValueError(f"min_new_tokens {min_new} not in [0, max_new_tokens {max_new}]")
    with coded_failure(ErrorCode.INVALID_REQUEST, f"request {request.request_id}"):
        ids = engine.encode_prompts([request])[0]
        staged = engine.stage_images(request)
    return SlotWork(
        request,
        ids,
        max_new,
        min_new,
        time.perf_counter() if submitted is None else submitted,
        JsonObjectEnd() if config.stop_at_json_close else None,
        staged=staged,
    )


def encode_works(
    engine: NativeInternVLEngine, works: list[SlotWork], context_id: int
) -> list[tuple[SlotWork, ProcessingError]]:
    """Queue the vision of `works` in one call (feature cache first); sets their features.

    Each work's staged tiles are released (their pinned memory is freed once the queued
    copies are done) and its `features` become one (image tokens, hidden) device tensor.
    Returns the requests whose feature count does not match their image tokens
    (`INVALID_REQUEST`); a failure of the model raises `ProcessingError(MODEL_FAILED)`.
    """
    import torch

    staged = [work.staged for work in works]
    with coded_failure(ErrorCode.MODEL_FAILED, "vision failed"):
        features_of = engine.image_features([work.request for work in works], staged=staged)
    failed = []
    now = time.perf_counter()
    for work, features in zip(works, features_of, strict=True):
        work.vision_ready = True
        work.staged = None
        work.started = now
        image_tokens = work.ids.count(context_id)
        count = sum(int(part.shape[0]) * int(part.shape[1]) for part in features)
        if count != image_tokens:
            failed.append(
                (
                    work,
                    ProcessingError(
                        ErrorCode.INVALID_REQUEST,
                        f"request {work.request.request_id}: {count} image features for "
                        f"{image_tokens} image tokens",
                        STAGE,
                    ),
                )
            )
        elif features:
            hidden = int(features[0].shape[-1])
            work.features = torch.cat([part.reshape(-1, hidden) for part in features])
    return failed
