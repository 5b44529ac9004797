"""The slot engine on the tiny random InternVL (CPU, float32): continuous batching.

Greedy ids must equal the one-at-a-time `generate` path whatever the admission order,
the step at which a request joins, chunked prefill that cuts through image tokens, and
early exits (token limits, an end token inside a round) that free slots mid-stream.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import NativeInternVLEngine
from processors.slot_engine import (
    JsonObjectEnd,
    SlotEngine,
    SlotEngineConfig,
    SlotScheduler,
    SlotWork,
)
from tests.processors.internvl.helpers import make_request
from tests.support.tiny_internvl import TinyCheckpoints, load_native

MAX_NEW = 12


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints: TinyCheckpoints) -> Path:
    return tiny_checkpoints.native()


@pytest.fixture(scope="module")
def requests() -> list[PreparedRequest]:
    return [
        make_request("a", "<image>\nDescribe the product.", (1,), seed=1),
        make_request(
            "b", "Vendor: <image>\nPickup: <image>\nSame product? Answer in JSON.", (1, 2), 2
        ),
        make_request("c", "<image><image> Same item?", (1, 1), seed=3),
        make_request("d", "No image here, only a question about a shirt.", (), seed=4),
        make_request("e", "<image> colour?", (1,), seed=5),
    ]


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> NativeInternVLEngine:
    return load_native(checkpoint, decode="generate", max_batch_size=1, max_new_tokens=MAX_NEW)


def _expected(engine: NativeInternVLEngine, requests: list[PreparedRequest]) -> list[list[int]]:
    return [engine.generate_token_ids([request])[0] for request in requests]


def _rounds(scheduler: SlotScheduler, out: dict[str, list[int]], rounds: int) -> None:
    for _ in range(rounds):
        ended, failed = scheduler.run_round()
        assert not failed
        for _work, completion in ended:
            out[completion.request_id] = list(completion.token_ids)


def _drain(scheduler: SlotScheduler, out: dict[str, list[int]]) -> None:
    for _ in range(1000):
        if scheduler.idle:
            return
        _rounds(scheduler, out, 1)
    raise AssertionError("the scheduler did not finish")


def _config(**overrides: object) -> SlotEngineConfig:
    settings: dict[str, object] = {
        "slots": 2,
        "context_length": 1024,
        "prefill_tokens_per_step": 300,  # prompts of 300-800 tokens: chunks cut through images
        "steps_per_round": 3,
        "stop_at_json_close": False,
        **overrides,
    }
    return SlotEngineConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("budget", "rows", "fuse", "mixed"),
    [
        (300, 8, False, 0),  # every prompt in chunks
        (2000, 2, False, 0),  # whole prompts batched two at a time
        (2000, 2, True, 0),  # the same with fused query/key/value and gate/up projections
        (2000, 2, False, 96),  # prompts joining running rows ride their steps in chunks
        (2000, 2, False, 256),  # the same in chunks of 256, last parts in 128 or 256
    ],
)
def test_admission_at_arbitrary_steps_matches_generate(
    checkpoint: Path,
    reference: NativeInternVLEngine,
    requests: list[PreparedRequest],
    budget: int,
    rows: int,
    fuse: bool,
    mixed: int,
) -> None:
    expected = _expected(reference, requests)
    limits = {"a": 5, "c": 9}  # early exits by token limit: greedy prefixes
    config = _config(
        slots=3, prefill_tokens_per_step=budget, prefill_rows=rows, mixed_chunk_tokens=mixed
    )
    engine = load_native(checkpoint, max_new_tokens=MAX_NEW, fuse_projections=fuse)
    scheduler = SlotScheduler(engine, config)
    out: dict[str, list[int]] = {}
    scheduler.add(requests[0], max_new_tokens=limits["a"])
    _rounds(scheduler, out, 1)  # "a" decodes alone for a round
    # A short text-only prompt and a long one share a prefill call (so rows cannot mix).
    scheduler.add(requests[3])
    scheduler.add(requests[1])
    scheduler.add(requests[2], max_new_tokens=limits["c"])  # waits: three slots only
    _rounds(scheduler, out, 2)  # part-way, then the last one joins a running batch
    scheduler.add(requests[4])
    _drain(scheduler, out)
    for request, ids in zip(requests, expected, strict=True):
        name = request.request_id
        assert out[name] == ids[: limits.get(name, MAX_NEW)], name
    assert scheduler.decoder.active.sum() == 0 and not scheduler.rows
    # Mixed: the three prompts that joined running rows went through mixed steps.
    assert scheduler.stats["mixed_steps"] >= (3 if mixed else 0)
    assert bool(scheduler.stats["mixed_steps"]) == bool(mixed)


def test_a_prompt_whose_running_rows_all_leave_goes_on_in_plain_chunks(
    checkpoint: Path, reference: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    """Mixed steps need a decoding row: when the last one leaves, the prompt's rest is chunked."""
    expected = _expected(reference, requests[:2])
    config = _config(
        slots=3, prefill_tokens_per_step=2000, steps_per_round=2, mixed_chunk_tokens=128
    )
    scheduler = SlotScheduler(load_native(checkpoint, max_new_tokens=MAX_NEW), config)
    out: dict[str, list[int]] = {}
    scheduler.add(requests[0], max_new_tokens=5)
    _rounds(scheduler, out, 1)  # "a" has 3 of its 5 tokens
    scheduler.add(requests[1])  # 3 images: ~800 prompt tokens, more than two chunks
    _rounds(scheduler, out, 1)  # two steps carry its first 256 tokens; "a" ends
    work = scheduler.prefilling
    assert work is not None and work.done == 256 < len(work.ids)
    assert not scheduler.rows and out["a"] == expected[0][:5]
    _drain(scheduler, out)
    assert out["b"] == expected[1]
    assert scheduler.stats["mixed_steps"] == 2


def test_prefill_groups_hold_no_padded_rows(
    checkpoint: Path, reference: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    """Five prompts that fit one budget go as 4 + 1 (the 8-row shape would pad 3 rows)."""
    expected = _expected(reference, requests)
    config = _config(slots=6, prefill_tokens_per_step=100_000, prefill_rows=8)
    scheduler = SlotScheduler(load_native(checkpoint, max_new_tokens=MAX_NEW), config)
    prefill = scheduler.decoder.prefill
    sizes: list[int] = []
    prefill_rows = prefill.prefill_rows

    def recorded(prompts: list[list[int]], *args: object, **kwargs: object) -> object:
        sizes.append(len(prompts))
        return prefill_rows(prompts, *args, **kwargs)  # type: ignore[arg-type]

    prefill.prefill_rows = recorded  # type: ignore[method-assign,assignment]
    for request in requests:
        scheduler.add(request)
    out: dict[str, list[int]] = {}
    _drain(scheduler, out)
    assert sizes == [4, 1]
    assert [out[request.request_id] for request in requests] == expected


def test_end_token_inside_a_round_frees_the_slot(
    checkpoint: Path, requests: list[PreparedRequest]
) -> None:
    """Stop on a token the model really produces: the row leaves mid-round, others go on."""
    probe = load_native(checkpoint, decode="generate", max_batch_size=1, max_new_tokens=MAX_NEW)
    first = probe.generate_token_ids([requests[0]])[0]
    stop = next(token for token in first[3:] if token not in first[:3])
    # The end token becomes one this random model produces: generate's eos_token_id and the
    # cut both read the engine's own attribute, which has no public setter.
    probe._im_end_id = stop  # noqa: SLF001
    expected = _expected(probe, requests)
    assert len(expected[0]) < MAX_NEW
    engine = load_native(checkpoint, max_new_tokens=MAX_NEW)
    engine._im_end_id = stop  # noqa: SLF001 - as above
    decoder = engine.decoder
    assert decoder is not None
    decoder.eos_id = stop
    scheduler = SlotScheduler(engine, _config(steps_per_round=5))
    for request in requests:
        scheduler.add(request)
    out: dict[str, list[int]] = {}
    _drain(scheduler, out)
    assert [out[request.request_id] for request in requests] == expected


def test_min_new_tokens_per_request(checkpoint: Path, requests: list[PreparedRequest]) -> None:
    forced = load_native(
        checkpoint, decode="generate", max_batch_size=1, max_new_tokens=MAX_NEW, min_new_tokens=10
    )
    expected = _expected(forced, requests[:3])
    scheduler = SlotScheduler(load_native(checkpoint, max_new_tokens=MAX_NEW), _config(slots=3))
    for request in requests[:3]:
        scheduler.add(request, min_new_tokens=10)
    out: dict[str, list[int]] = {}
    _drain(scheduler, out)
    assert [out[request.request_id] for request in requests[:3]] == expected


def test_bad_requests_fail_alone(checkpoint: Path, requests: list[PreparedRequest]) -> None:
    scheduler = SlotScheduler(load_native(checkpoint, max_new_tokens=MAX_NEW), _config())
    with pytest.raises(ProcessingError) as wrong_count:
        scheduler.add(make_request("x", "<image> <image>", (1,), seed=1))
    assert wrong_count.value.code == ErrorCode.INVALID_REQUEST
    with pytest.raises(ProcessingError) as too_long:
        scheduler.add(requests[1], max_new_tokens=1000)
    assert (
        too_long.value.code == ErrorCode.INVALID_REQUEST and "fit a slot" in too_long.value.message
    )
    assert scheduler.idle


def test_json_object_end() -> None:
    cases = {
        'Here: {"a": {"b": "x}"}, "c": 1} trailing': len('Here: {"a": {"b": "x}"}, "c": 1}'),
        '```json\n{"q": "say \\"}\\" ok"}\n```': len('```json\n{"q": "say \\"}\\" ok"}'),
        "} no object { still open": None,
    }
    for text, end in cases.items():
        tracker = JsonObjectEnd()
        closed_at = next((i + 1 for i, char in enumerate(text) if tracker.feed(char)), None)
        assert closed_at == end, text


def test_streaming_engine_is_thread_safe_and_pushes_back(
    checkpoint: Path, reference: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    expected = {
        r.request_id: ids for r, ids in zip(requests, _expected(reference, requests), strict=True)
    }
    engine = SlotEngine(
        load_native(checkpoint, max_new_tokens=MAX_NEW),
        _config(queue_size=1, slots=2, staged_requests=2),
    )
    with pytest.raises(ProcessingError):
        engine.submit(requests[0])  # not loaded
    engine.load()
    try:
        results: dict[str, list[int]] = {}
        lock = threading.Lock()

        def producer(part: list[PreparedRequest]) -> None:
            futures = [engine.submit(request) for request in part]
            for future in futures:
                completion = future.result(timeout=120)
                with lock:
                    results[completion.request_id] = list(completion.token_ids)

        threads = [
            threading.Thread(target=producer, args=(requests[index::2],)) for index in (0, 1)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert results == expected
        assert engine.generate(requests[:2]) == reference.generate(requests[:2])
        bad = engine.submit(make_request("x", "<image> <image>", (1,), seed=1))
        with pytest.raises(ProcessingError) as failure:
            bad.result(timeout=60)
        assert failure.value.code == ErrorCode.INVALID_REQUEST
        # A full queue pushes back: with the scheduler thread held, the bounded hand-over
        # (one prepared request) and queue (one submission) fill, and then a put waits.
        with engine.engine.lock:
            engine.submit(requests[0])  # taken by the scheduler thread, which then blocks
            taken = 0
            try:
                for _ in range(8):
                    engine.submit(requests[1], timeout=0.5)
                    taken += 1
            except queue.Full:
                pass
            assert taken < 8 and not engine.has_room()
    finally:
        engine.close()


class _Spelled:
    """Test double of the tokenizer for the JSON stop: chosen ids read as braces, others as x."""

    def __init__(self, tokenizer: object, spelled: dict[int, str]) -> None:
        self.tokenizer = tokenizer
        self.spelled = spelled

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.spelled.get(token, "x") for token in ids]

    def decode(self, *args: object, **kwargs: object) -> str:
        return self.tokenizer.decode(*args, **kwargs)  # type: ignore[attr-defined,no-any-return]


def test_a_request_leaves_when_its_json_object_closes(
    checkpoint: Path, reference: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    expected = _expected(reference, requests[:2])
    ids = expected[0]
    opening = next(i for i in range(1, 6) if ids[i] not in ids[:i])
    closing = next(i for i in range(opening + 2, MAX_NEW) if ids[i] not in ids[:i])
    scheduler = SlotScheduler(
        load_native(checkpoint, max_new_tokens=MAX_NEW), _config(stop_at_json_close=True)
    )
    scheduler.tokenizer = _Spelled(scheduler.tokenizer, {ids[opening]: "{", ids[closing]: "}"})
    works = [scheduler.add(request) for request in requests[:2]]
    finished = {}
    for _ in range(100):
        if scheduler.idle:
            break
        for work, completion in scheduler.run_round()[0]:
            finished[work.request.request_id] = completion
    first = finished[requests[0].request_id]
    assert first.finish == "json" and list(first.token_ids) == ids[: closing + 1]
    other = finished[requests[1].request_id]  # its own ids decide (spelled x unless shared)
    assert list(other.token_ids) == expected[1][: len(other.token_ids)]
    assert works[0].json is not None


def test_a_model_failure_fails_the_requests_in_flight_and_the_engine_goes_on(
    checkpoint: Path, reference: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    expected = _expected(reference, requests[:3])
    engine = SlotEngine(load_native(checkpoint, max_new_tokens=MAX_NEW), _config())
    engine.load()
    try:
        scheduler = engine.scheduler
        assert scheduler is not None
        step = scheduler.decoder.step

        def broken(active: int) -> None:
            if active >= 2:  # both requests in flight
                raise RuntimeError("device lost")
            step(active)

        scheduler.decoder.step = broken  # type: ignore[method-assign]
        futures = [engine.submit(request) for request in requests[:2]]
        for future in futures:
            with pytest.raises(ProcessingError) as failure:
                future.result(timeout=120)
            assert failure.value.code == ErrorCode.MODEL_FAILED
            assert "device lost" in failure.value.message
        assert not scheduler.rows and scheduler.decoder.active.sum() == 0
        alone = engine.submit(requests[2]).result(timeout=120)
        assert list(alone.token_ids) == expected[2]
    finally:
        engine.close()
    with pytest.raises(ProcessingError) as closed:
        engine.submit(requests[0])
    assert closed.value.code == ErrorCode.MODEL_NOT_LOADED


def test_staged_tiles_are_bounded_and_released_after_vision(
    checkpoint: Path, reference: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    expected = _expected(reference, requests[:3])
    scheduler = SlotScheduler(
        load_native(checkpoint, max_new_tokens=MAX_NEW), _config(slots=8, staged_requests=4)
    )
    works = [scheduler.prepare(request) for request in requests[:3]]
    assert all(work.staged is not None and work.staged.images for work in works)
    assert scheduler.capacity() == 2  # half the bound may wait admitted
    scheduler.admit(works[0])
    scheduler.admit(works[1])
    assert scheduler.capacity() == 0  # slots are free, but two wait with staged tiles
    out: dict[str, list[int]] = {}
    _rounds(scheduler, out, 1)
    assert works[0].staged is None and works[1].staged is None  # the tower took them
    assert scheduler.capacity() == 2
    scheduler.admit(works[2])
    _drain(scheduler, out)
    assert [out[request.request_id] for request in requests[:3]] == expected
    with pytest.raises(ValueError, match="staged_requests"):
        SlotEngineConfig(staged_requests=1)


def test_a_round_end_takes_newcomers_and_queues_their_vision_first(
    checkpoint: Path, reference: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    expected = _expected(reference, requests[:2])
    scheduler = SlotScheduler(load_native(checkpoint, max_new_tokens=MAX_NEW), _config(slots=4))
    out: dict[str, list[int]] = {}
    scheduler.add(requests[0])
    _rounds(scheduler, out, 1)
    newcomer = scheduler.prepare(requests[1])
    seen: list[bool] = []

    def intake() -> None:  # what the engine's thread admits at the round's end
        seen.append(newcomer.vision_ready)
        scheduler.admit(newcomer)

    ended, failed = scheduler.run_round(intake)
    assert not ended and not failed and seen == [False]
    # Encoded before the host took the round's ids; prefilled in the next round.
    assert newcomer.vision_ready and newcomer.staged is None
    assert list(scheduler.waiting) == [newcomer] and len(scheduler.rows) == 1
    _drain(scheduler, out)
    assert [out[request.request_id] for request in requests[:2]] == expected


def test_an_unexpected_admission_error_fails_only_its_request(
    checkpoint: Path, reference: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    expected = _expected(reference, requests[:2])
    engine = SlotEngine(load_native(checkpoint, max_new_tokens=MAX_NEW), _config())
    engine.load()
    try:
        scheduler = engine.scheduler
        assert scheduler is not None
        admit = scheduler.admit

        def refusing(work: SlotWork) -> None:  # e.g. the grammar library fails to import
            if work.request.request_id == "b":
                raise ModuleNotFoundError("No module named 'tvm_ffi'")
            admit(work)

        scheduler.admit = refusing  # type: ignore[method-assign]
        futures = [engine.submit(request) for request in requests[:2]]
        with pytest.raises(ProcessingError) as failure:
            futures[1].result(timeout=60)
        assert failure.value.code == ErrorCode.MODEL_FAILED and "tvm_ffi" in str(failure.value)
        assert list(futures[0].result(timeout=60).token_ids) == expected[0]
        scheduler.admit = admit  # type: ignore[method-assign]
        assert list(engine.submit(requests[1]).result(timeout=60).token_ids) == expected[1]
    finally:
        engine.close()


def test_a_failed_scheduler_thread_leaves_no_request_waiting(
    checkpoint: Path, requests: list[PreparedRequest]
) -> None:
    engine = SlotEngine(load_native(checkpoint, max_new_tokens=MAX_NEW), _config())
    engine.load()
    try:
        scheduler = engine.scheduler
        assert scheduler is not None

        def broken() -> int:
            raise RuntimeError("scheduler bug")

        scheduler.capacity = broken  # type: ignore[method-assign]
        future = engine.submit(requests[0])
        with pytest.raises(ProcessingError) as failure:
            future.result(timeout=60)
        assert failure.value.code == ErrorCode.MODEL_FAILED
        assert "scheduler bug" in str(failure.value)
        with pytest.raises(ProcessingError, match="slot engine stopped"):
            engine.submit(requests[1])
    finally:
        engine.close(timeout=10)
