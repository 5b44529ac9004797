"""A request's way into the slot scheduler: its host work, then its images' features.

`prepare_work` (any thread) tokenizes the prompt and stages the tiles
(`NativeInternVLEngine.stage_images`: converted to the model's dtype, pinned on CUDA,
vendor images hashed), a few milliseconds per request that the slot engine keeps off the
thread that feeds the GPU (`processors.slot_engine`). It reads the engine's settings and
tokenizer only. `encode_works` (the scheduler's thread) queues the vision tower over the
staged tiles of a group of admitted requests; `VisionLane` says on which stream.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import NativeInternVLEngine, coded_failure, green_stream, new_event
from processors.slot_records import STAGE, JsonObjectEnd, SlotEngineConfig, SlotWork

log = logging.getLogger(__name__)


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


class VisionLane:
    """Where the scheduler's vision work runs (`SlotEngineConfig.vision_sms`).

    Without a lane stream (the default, and always off CUDA) `encode` queues the vision
    tower on the scheduler's stream, between decode steps, and every request is `ready`
    at once. With `sms` > 0 on CUDA it goes to a stream of a green context of that many
    multiprocessors: decode steps, latency-bound at small batches, run meanwhile on the
    others instead of waiting for ~11 ms of vision per request of 7 tiles. A request is
    `ready` for prefill once its vision event has completed (the host asks, never waits),
    and `hand_over` orders the scheduler's stream after that event and marks the
    features as used there, so the allocator keeps their memory until that use is done.
    The side stream reads only what it made itself (pinned tiles, its features, feature
    cache entries it wrote), so it never waits for the scheduler's stream.

    Where torch, the driver or the device offers no green context, the lane stays on the
    scheduler's stream and `error` says why (logged once).
    """

    def __init__(self, engine: NativeInternVLEngine, sms: int) -> None:
        self.engine = engine
        self.error: str | None = None
        self.stream: Any = None
        if sms and str(engine.device).startswith("cuda"):
            try:
                _, self.stream = green_stream(engine.device, sms)  # kept for the process
            except (RuntimeError, TypeError, AttributeError, ImportError, ValueError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("slot engine: vision stays between decode steps: %s", self.error)

    def encode(
        self, works: list[SlotWork], context_id: int
    ) -> list[tuple[SlotWork, ProcessingError]]:
        """`encode_works` on the lane's stream; each work keeps the event of its vision."""
        if self.stream is None:
            return encode_works(self.engine, works, context_id)
        import torch

        with torch.cuda.stream(self.stream):
            failed = encode_works(self.engine, works, context_id)
            done = new_event()
            done.record(self.stream)
        for work in works:
            work.vision_done = done
        return failed

    @staticmethod
    def ready(work: SlotWork) -> bool:
        """Whether `work`'s vision has finished on the GPU (no wait)."""
        return work.vision_done is None or bool(work.vision_done.query())

    def hand_over(self, works: list[SlotWork]) -> None:
        """Order the current stream after `works`' vision; keep their features' memory.

        Call before the current stream reads their features (prefill). Idempotent.
        """
        if self.stream is None:
            return
        import torch

        current = torch.cuda.current_stream(self.engine.device)
        for work in works:
            if work.vision_done is not None:
                current.wait_event(work.vision_done)
                work.vision_done = None
            if work.features is not None:
                work.features.record_stream(current)
