"""Tests of processors.verification: the micro-batch pipeline.

Test doubles here (for tests only): `RecordingEngine` wraps the real `ReplayEngine` and
records every `generate` call; `FakeImageSource` hands out in-memory images; `FakeTimer`
is a clock the engine advances, so model-time shares are exact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from processors.errors import ErrorCode, Failure, ProcessingError
from processors.gathering import GatheredImages
from processors.inference import IMAGE_PLACEHOLDER, PreparedRequest, ReplayEngine
from processors.prompt import build_prompt, prompt_hash
from processors.records import PickupRequest, SourcePosition, input_key
from processors.tiling import TilingConfig
from processors.verification import (
    VerificationInput,
    VerificationOutcome,
    VerificationPipeline,
)

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 8, 14, 10, 0, tzinfo=UTC)

QUESTIONS = [
    {
        "Type": "boolean",
        "Label": "Is the product damaged?",
        "IsMandatory": "true",
        "ValueToCheck": "No",
    },
    {"Type": "text", "Label": "Colour", "IsMandatory": "true", "ValueToCheck": "Navy"},
]


def _event(n: int, **changes: Any) -> dict[str, Any]:
    event = {
        "event_id": f"evt-{n}",
        "occurred_at": 1_755_160_000_000 + n,
        "pickupproductimage": [
            "https://images.example.com/v/1.jpg",
            "https://images.example.com/v/2.jpg",
        ],
        "skupickdone": ["aGVsbG8=", "aGVsbG8=", "aGVsbG8="],
        "productname": f"Product {n}",
        "question": json.dumps(QUESTIONS),
        "shippingid": f"SHIP-{n}",
        "uuid": f"uuid-{n}",
    }
    event.update(changes)
    return event


def _request(n: int, **changes: Any) -> PickupRequest:
    return PickupRequest.from_event(_event(n, **changes))


def _answer(recommendation: str = "Accept", colour: str = "Navy") -> str:
    return json.dumps(
        {
            "image_analysis": {"pickup_images": "p", "vendor_image": "v", "comparison": "c"},
            "verification_results": [
                {
                    "Type": "boolean",
                    "Label": "Is the product damaged?",
                    "IsMandatory": "true",
                    "ValueToCheck": "No",
                    "Result": "No",
                    "Evidence": "clean",
                    "Confidence": 90,
                    "isRetakeImage": "false",
                },
                {
                    "Type": "text",
                    "Label": "Colour",
                    "IsMandatory": "true",
                    "ValueToCheck": "Navy",
                    "Result": colour,
                    "Evidence": "same blue",
                    "Confidence": 80,
                    "isRetakeImage": "false",
                },
            ],
            "pickup_confidence": {
                "overall_score": 85,
                "confidence_factors": {
                    "image_quality": 80,
                    "attribute_visibility": 80,
                    "matching_confidence": 80,
                },
                "recommendation": recommendation,
            },
        }
    )


INVALID = "I think the product matches the listing."
TRUNCATED = _answer()[:200]


class FakeTimer:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class RecordingEngine:
    """`ReplayEngine` plus a log of every call; optional extra failures and time per call."""

    def __init__(
        self,
        outputs: Mapping[str, Sequence[str]],
        *,
        timer: FakeTimer | None = None,
        seconds_per_call: float = 0.0,
        crash_on: frozenset[str] = frozenset(),
    ) -> None:
        self._replay = ReplayEngine(outputs, version="replay@test")
        self.calls: list[list[PreparedRequest]] = []
        self._timer = timer
        self._seconds = seconds_per_call
        self._crash_on = crash_on

    @property
    def model_version(self) -> str:
        return self._replay.model_version

    def load(self) -> None:
        return None

    def generate(self, batch: Sequence[PreparedRequest]) -> list[str]:
        self.calls.append(list(batch))
        if self._timer is not None:
            self._timer.now += self._seconds
        crashing = [r.request_id for r in batch if r.request_id in self._crash_on]
        if crashing:
            raise RuntimeError(f"CUDA error for {crashing[0]}")
        return self._replay.generate(batch)

    def call_shapes(self) -> list[list[tuple[str, int]]]:
        return [[(r.request_id, r.attempt) for r in call] for call in self.calls]


class FakeImageSource:
    """Hands out prepared `GatheredImages` (or failures) by shipping id; logs batches."""

    def __init__(self, results: Mapping[str, GatheredImages | Failure]) -> None:
        self._results = results
        self.batches: list[list[str]] = []

    async def gather_batch(
        self, requests: Sequence[PickupRequest]
    ) -> list[GatheredImages | Failure]:
        self.batches.append([r.shippingid for r in requests])
        return [self._results[r.shippingid] for r in requests]


def _pipeline(engine: Any, **kwargs: Any) -> VerificationPipeline:
    kwargs.setdefault("images", None)
    kwargs.setdefault("tiling", None)
    kwargs.setdefault("clock", lambda: NOW)
    return VerificationPipeline(engine, **kwargs)


async def _run(
    pipeline: VerificationPipeline, *requests: PickupRequest
) -> list[VerificationOutcome]:
    inputs = [
        VerificationInput(r, SourcePosition("pickup-completed", 0, i))
        for i, r in enumerate(requests)
    ]
    return await pipeline.run(inputs, batch_id="batch-7")


# ------------------------------------------------------------------------------ pipeline


async def test_valid_first_time() -> None:
    engine = RecordingEngine({"uuid-1": [_answer()]})
    [outcome] = await _run(_pipeline(engine), _request(1))
    assert outcome.failure is None
    assert outcome.decision is not None
    assert outcome.decision.ai_decision == "Pick"
    assert outcome.decision.source == SourcePosition("pickup-completed", 0, 0)
    assert outcome.raw_outputs == (_answer(),)
    [attempt] = outcome.attempts
    expected_prompt = build_prompt("Product 1", QUESTIONS, 2, 3)
    assert engine.calls[0][0].prompt == expected_prompt
    assert attempt.prompt_hash == prompt_hash(expected_prompt)
    assert (attempt.attempt, attempt.validation_status, attempt.validation_error) == (
        1,
        "valid",
        "",
    )
    assert (attempt.batch_id, attempt.batch_size, attempt.model_version) == (
        "batch-7",
        1,
        "replay@test",
    )
    assert attempt.idempotency_key == input_key("pickup-completed", {"event_id": "evt-1"})
    assert attempt.occurred_at_ms == int(NOW.timestamp() * 1000)
    assert (attempt.request_uuid, attempt.shippingid) == ("uuid-1", "SHIP-1")


async def test_replay_mode_sends_one_tile_per_image_and_no_pixels() -> None:
    engine = RecordingEngine({"uuid-1": [_answer()]})
    await _run(_pipeline(engine), _request(1))
    [[prepared]] = engine.calls
    assert prepared.num_patches == (1, 1, 1, 1, 1)
    assert prepared.pixel_values is None
    assert prepared.prompt.count(IMAGE_PLACEHOLDER) == 5


async def test_invalid_then_valid_records_two_attempts_with_a_strict_retry() -> None:
    engine = RecordingEngine(
        {"uuid-1": [_answer()], "uuid-2": [INVALID, _answer("Reject", "Black")]}
    )
    first, second = await _run(_pipeline(engine), _request(1), _request(2))
    # One call for every first attempt, one for the retries only.
    assert engine.call_shapes() == [[("uuid-1", 1), ("uuid-2", 1)], [("uuid-2", 2)]]
    assert first.decision is not None and len(first.attempts) == 1
    assert second.decision is not None
    assert second.decision.ai_decision == "Not Pick"
    assert second.raw_outputs == (INVALID, _answer("Reject", "Black"))
    one, two = second.attempts
    assert (one.attempt, one.validation_status, one.validation_error) == (
        1,
        "invalid",
        "no JSON object found",
    )
    assert (one.batch_size, two.batch_size) == (2, 1)
    assert (two.attempt, two.validation_status) == (2, "valid")
    strict = build_prompt("Product 2", QUESTIONS, 2, 3, strict=True)
    assert engine.calls[1][0].prompt == strict
    assert two.prompt_hash == prompt_hash(strict) != one.prompt_hash


async def test_invalid_twice_fails_and_keeps_both_outputs() -> None:
    engine = RecordingEngine({"uuid-1": [INVALID, TRUNCATED]})
    [outcome] = await _run(_pipeline(engine), _request(1))
    assert outcome.decision is None
    assert outcome.failure is not None
    assert outcome.failure.code is ErrorCode.MODEL_OUTPUT_INVALID
    assert outcome.failure.stage == "parse"
    assert "attempt 1: no JSON object found" in outcome.failure.message
    assert "attempt 2: " in outcome.failure.message
    assert outcome.raw_outputs == (INVALID, TRUNCATED)
    assert [a.validation_status for a in outcome.attempts] == ["invalid", "invalid"]


async def test_unknown_recommendation_is_retried_then_gets_its_own_code() -> None:
    engine = RecordingEngine({"uuid-1": [_answer("Maybe"), _answer("Perhaps")]})
    [outcome] = await _run(_pipeline(engine), _request(1))
    assert outcome.failure is not None
    assert outcome.failure.code is ErrorCode.UNKNOWN_RECOMMENDATION
    assert "unknown recommendation 'Maybe'" in outcome.failure.message
    assert "unknown recommendation 'Perhaps'" in outcome.failure.message
    assert [a.validation_status for a in outcome.attempts] == ["invalid", "invalid"]


async def test_an_unknown_recommendation_fixed_on_the_retry_is_decided() -> None:
    engine = RecordingEngine({"uuid-1": [_answer("Maybe"), _answer()]})
    [outcome] = await _run(_pipeline(engine), _request(1))
    assert outcome.decision is not None and outcome.failure is None


async def test_an_answer_invalid_after_an_unknown_recommendation_is_invalid() -> None:
    engine = RecordingEngine({"uuid-1": [_answer("Maybe"), INVALID]})
    [outcome] = await _run(_pipeline(engine), _request(1))
    assert outcome.failure is not None
    assert outcome.failure.code is ErrorCode.MODEL_OUTPUT_INVALID


async def test_engine_raising_for_one_request_spares_the_others() -> None:
    engine = RecordingEngine(
        {"uuid-1": [_answer()], "uuid-2": [_answer()], "uuid-3": [_answer("Reject", "Red")]},
        crash_on=frozenset({"uuid-2"}),
    )
    outcomes = await _run(_pipeline(engine), _request(1), _request(2), _request(3))
    assert engine.call_shapes() == [
        [("uuid-1", 1), ("uuid-2", 1), ("uuid-3", 1)],
        [("uuid-1", 1)],
        [("uuid-2", 1)],
        [("uuid-3", 1)],
    ]
    assert [o.input.request.uuid for o in outcomes] == ["uuid-1", "uuid-2", "uuid-3"]
    assert outcomes[0].decision is not None and outcomes[0].decision.ai_decision == "Pick"
    assert outcomes[2].decision is not None and outcomes[2].decision.ai_decision == "Not Pick"
    failure = outcomes[1].failure
    assert failure is not None
    assert (failure.code, failure.stage) == (ErrorCode.MODEL_FAILED, "model")
    assert failure.message == "RuntimeError: CUDA error for uuid-2"
    assert outcomes[1].attempts == ()
    assert [a.batch_size for a in outcomes[0].attempts] == [1]


async def test_missing_recording_on_retry_is_model_failed() -> None:
    engine = RecordingEngine({"uuid-1": [INVALID]})
    [outcome] = await _run(_pipeline(engine), _request(1))
    assert outcome.failure is not None
    assert outcome.failure.code is ErrorCode.MODEL_FAILED
    assert outcome.raw_outputs == (INVALID,)


async def test_order_is_kept_with_mixed_failures() -> None:
    engine = RecordingEngine(
        {"uuid-1": [_answer()], "uuid-3": [INVALID, INVALID], "uuid-4": [_answer("Retry", "Black")]}
    )
    outcomes = await _run(
        _pipeline(engine),
        _request(1),
        _request(2, question="not questions"),
        _request(3),
        _request(4),
    )
    assert [o.input.request.uuid for o in outcomes] == ["uuid-1", "uuid-2", "uuid-3", "uuid-4"]
    kinds = [o.decision.ai_decision if o.decision else str(o.failure) for o in outcomes]
    kinds = [k.split("]")[0] for k in kinds]
    assert kinds == ["Pick", "[1101 INVALID_QUESTION", "[1301 MODEL_OUTPUT_INVALID", "Not Pick"]
    assert outcomes[1].failure is not None and outcomes[1].failure.stage == "prompt"
    # The request with bad questions never reaches the engine.
    assert all(r.request_id != "uuid-2" for call in engine.calls for r in call)


async def test_model_time_is_shared_and_total_time_measured() -> None:
    timer = FakeTimer()
    engine = RecordingEngine(
        {"uuid-1": [_answer()], "uuid-2": [INVALID, _answer()]}, timer=timer, seconds_per_call=4.0
    )
    first, second = await _run(_pipeline(engine, timer=timer), _request(1), _request(2))
    assert first.decision is not None and second.decision is not None
    assert first.decision.processing_time_ai == pytest.approx(2.0)  # half of the first call
    assert second.decision.processing_time_ai == pytest.approx(6.0)  # half + its own retry
    assert first.decision.total_time == pytest.approx(8.0)
    assert [a.model_ms for a in second.attempts] == [pytest.approx(4000.0), pytest.approx(4000.0)]


async def test_failed_batch_call_time_is_shared_too() -> None:
    timer = FakeTimer()
    engine = RecordingEngine(
        {"uuid-1": [_answer()], "uuid-2": [_answer()]},
        timer=timer,
        seconds_per_call=1.0,
        crash_on=frozenset({"uuid-2"}),
    )
    first, _ = await _run(_pipeline(engine, timer=timer), _request(1), _request(2))
    assert first.decision is not None
    assert first.decision.processing_time_ai == pytest.approx(1.5)  # 1.0 / 2 + own 1.0


async def test_decide_failure_becomes_a_failure() -> None:
    engine = RecordingEngine({"uuid-1": [_answer()]})
    naive = datetime(2025, 1, 1)  # noqa: DTZ001 - decide refuses naive datetimes
    [outcome] = await _run(_pipeline(engine, clock=lambda: naive), _request(1))
    assert outcome.failure is not None
    assert (outcome.failure.code, outcome.failure.stage) == (ErrorCode.INTERNAL, "decide")
    assert len(outcome.attempts) == 1


async def test_empty_batch() -> None:
    assert await _pipeline(RecordingEngine({})).run([], batch_id="empty") == []


def test_outcome_needs_exactly_one_result() -> None:
    inp = VerificationInput(_request(1))
    with pytest.raises(ValueError, match="exactly one"):
        VerificationOutcome(inp, None, None)


# ------------------------------------------------------------------------------ with images


def _gathered(vendor: int, pickup: int, gather_ms: float = 12.0) -> GatheredImages:
    return GatheredImages(
        vendor=tuple(Image.new("RGB", (64, 64), (0, 0, 200)) for _ in range(vendor)),
        # Wide pickup photos: two tiles plus a thumbnail each.
        pickup=tuple(Image.new("RGB", (128, 64), (0, 0, 180)) for _ in range(pickup)),
        gather_ms=gather_ms,
    )


async def test_images_are_gathered_once_per_batch_and_tiled() -> None:
    source = FakeImageSource(
        {
            "SHIP-1": _gathered(2, 3),
            "SHIP-2": Failure(
                ErrorCode.IMAGE_DOWNLOAD_FAILED, "vendor image 1: HTTP 404", "gather"
            ),
            "SHIP-3": _gathered(1, 1),
        }
    )
    engine = RecordingEngine({"uuid-1": [_answer()], "uuid-3": [_answer()]})
    pipeline = _pipeline(engine, images=source, tiling=TilingConfig())
    one, two, three = await _run(
        pipeline,
        _request(1),
        _request(2),
        _request(3, pickupproductimage=["https://x.example/a.jpg"], skupickdone=["aGk="]),
    )
    assert source.batches == [["SHIP-1", "SHIP-2", "SHIP-3"]]
    assert one.decision is not None and three.decision is not None
    assert two.failure == Failure(
        ErrorCode.IMAGE_DOWNLOAD_FAILED, "vendor image 1: HTTP 404", "gather"
    )
    [[first, third]] = engine.calls
    assert first.num_patches == (1, 1, 3, 3, 3)
    assert tuple(first.pixel_values.shape) == (11, 3, 448, 448)
    assert first.prompt.count(IMAGE_PLACEHOLDER) == 5
    assert "Images 1 to 2 (two images) are vendor" in first.prompt
    assert third.num_patches == (1, 3)
    assert one.attempts[0].gather_ms >= 12.0


async def test_tiling_failure_fails_only_that_request() -> None:
    def tile(gathered: GatheredImages, config: TilingConfig) -> Any:
        if len(gathered.pickup) == 2:
            raise ValueError("image must have pixels")
        return _Tiled(
            None,
            (1,) * (len(gathered.vendor) + len(gathered.pickup)),
            len(gathered.vendor),
            len(gathered.pickup),
        )

    source = FakeImageSource({"SHIP-1": _gathered(1, 1), "SHIP-2": _gathered(1, 2)})
    engine = RecordingEngine({"uuid-1": [_answer()]})
    pipeline = _pipeline(engine, images=source, tiling=TilingConfig(), tile=tile)
    one, two = await _run(pipeline, _request(1), _request(2))
    assert one.decision is not None
    assert two.failure is not None
    assert (two.failure.code, two.failure.stage) == (ErrorCode.INTERNAL, "tile")
    assert "ValueError: image must have pixels" in two.failure.message


class _Tiled:
    def __init__(
        self, pixel_values: Any, num_patches: tuple[int, ...], vendor: int, pickup: int
    ) -> None:
        self.pixel_values = pixel_values
        self.num_patches = num_patches
        self.vendor_count = vendor
        self.pickup_count = pickup


async def test_image_source_raising_fails_the_whole_batch() -> None:
    class Broken:
        async def gather_batch(
            self, requests: Sequence[PickupRequest]
        ) -> list[GatheredImages | Failure]:
            raise ProcessingError(ErrorCode.IMAGE_TIMEOUT, "everything timed out", "gather")

    engine = RecordingEngine({})
    outcomes = await _run(
        _pipeline(engine, images=Broken(), tiling=TilingConfig()), _request(1), _request(2)
    )
    assert [o.failure.code if o.failure else None for o in outcomes] == [
        ErrorCode.IMAGE_TIMEOUT
    ] * 2
    assert engine.calls == []


async def test_each_phase_is_reported_once_per_batch_with_its_wall_time() -> None:
    timer = FakeTimer()

    def tile(gathered: GatheredImages, config: TilingConfig) -> Any:
        timer.now += 0.5  # every tiling call takes half a second of the fake clock
        count = len(gathered.vendor) + len(gathered.pickup)
        return _Tiled(None, (1,) * count, len(gathered.vendor), len(gathered.pickup))

    source = FakeImageSource({f"SHIP-{n}": _gathered(1, 1) for n in (1, 2, 3)})
    # Request 2 answers unreadably first: two engine calls, one "model" observation.
    engine = RecordingEngine(
        {"uuid-1": [_answer()], "uuid-2": [INVALID, _answer()], "uuid-3": [_answer()]},
        timer=timer,
        seconds_per_call=2.0,
    )
    phases: list[tuple[str, float]] = []
    pipeline = _pipeline(
        engine,
        images=source,
        tiling=TilingConfig(),
        tile=tile,
        timer=timer,
        on_phase=lambda phase, seconds: phases.append((phase, seconds)),
    )
    outcomes = await _run(pipeline, _request(1), _request(2), _request(3))
    assert all(o.decision is not None for o in outcomes)
    assert len(engine.calls) == 2
    assert [phase for phase, _ in phases] == ["gather", "tile", "model", "decide"]
    seconds = dict(phases)
    assert seconds["model"] == pytest.approx(4.0)  # both calls, once
    assert seconds["tile"] == pytest.approx(1.5)  # three tilings in one phase
    assert seconds["gather"] == seconds["decide"] == 0.0  # the fake clock did not move


async def test_replay_mode_reports_only_the_model_and_decide_phases() -> None:
    phases: list[str] = []
    pipeline = _pipeline(
        RecordingEngine({"uuid-1": [_answer()]}),
        on_phase=lambda phase, seconds: phases.append(phase),
    )
    await _run(pipeline, _request(1), _request(2))  # 2 has no recording: MODEL_FAILED
    assert phases == ["model", "decide"]


def test_image_source_needs_tiling_config() -> None:
    with pytest.raises(ValueError, match="TilingConfig"):
        VerificationPipeline(RecordingEngine({}), images=FakeImageSource({}), tiling=None)
