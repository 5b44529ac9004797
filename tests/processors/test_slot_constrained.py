"""Constrained decoding in the slot engine (tiny random InternVL, CPU, float32).

Stepping through every token inside the grammar equals the static engine's constrained
greedy ids; forced runs (the grammar's forced tokens written in one multi-token forward
pass) equal feeding the same tokens one forward pass at a time; every answer is valid
against its request's own schema at the first attempt, and free rows beside constrained
rows decode as they would alone.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from jsonschema import Draft202012Validator

from processors.answer_parsing import parse_answer
from processors.answer_schema import FieldLimits, answer_schema
from processors.constrained import GrammarCache
from processors.inference import PreparedRequest
from processors.internvl import NativeInternVLEngine
from processors.prompt import build_prompt, parse_questions
from processors.slot_decoder import SlotDecoder
from processors.slot_engine import SlotEngineConfig, SlotScheduler
from tests.processors.test_answer_schema import QUESTION_SETS
from tests.support.tiny_internvl import TinyCheckpoints, load_native

MAX_NEW = 1500
LIMITS = FieldLimits(analysis=4, evidence=4, text_result=3)
SETS = ("one boolean", "mixed types", "quotes and non-ASCII")


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: TinyCheckpoints) -> NativeInternVLEngine:
    return load_native(tiny_checkpoints.native(), max_new_tokens=MAX_NEW, grammar_threads=2)


def _request(name: str, questions: list[dict[str, Any]] | None, seed: int) -> PreparedRequest:
    listed = questions if questions is not None else QUESTION_SETS["one boolean"]
    parsed = parse_questions(json.dumps(listed, ensure_ascii=False))
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(seed))
    prompt = build_prompt("Running shoe «Größe 43»", parsed, 1, 1)
    schema = answer_schema(parsed, LIMITS) if questions is not None else None
    return PreparedRequest(name, 1, prompt, (1, 1), pixels, answer_schema=schema)


@pytest.fixture(scope="module")
def requests() -> list[PreparedRequest]:
    return [_request(name, QUESTION_SETS[name], seed) for seed, name in enumerate(SETS)]


def _scheduler(engine: NativeInternVLEngine, **overrides: Any) -> SlotScheduler:
    settings: dict[str, Any] = {
        "slots": 2,
        "context_length": 4096,
        "prefill_tokens_per_step": 2000,
        "steps_per_round": 4,
        **overrides,
    }
    return SlotScheduler(engine, SlotEngineConfig(**settings))


def _drain(scheduler: SlotScheduler, requests: list[PreparedRequest]) -> dict[str, list[int]]:
    for request in requests:
        scheduler.add(request)
    out: dict[str, list[int]] = {}
    for _ in range(5000):
        if scheduler.idle:
            return out
        ended, failed = scheduler.run_round()
        assert not failed
        for _work, completion in ended:
            out[completion.request_id] = list(completion.token_ids)
    raise AssertionError("the scheduler did not finish")


def _stepwise(decoder: SlotDecoder) -> Any:
    """A `wide_step` that feeds each row's chunk one token per forward pass (the reference)."""

    def wide_step(active: int, size: int, mask: Any = None) -> Any:
        starts = decoder.packed[3, :active].tolist()
        widths = decoder.packed[4, :active].tolist()
        chunks = [
            decoder.packed[0, s : s + w].tolist() for s, w in zip(starts, widths, strict=True)
        ]
        final = torch.zeros_like(decoder.logits[:active])
        for index in range(max(widths)):
            feeding = [chunk[index : index + 1] for chunk in chunks]
            decoder.forward_packed(decoder.load_chunks(feeding))
            for row, width in enumerate(widths):
                if width - 1 == index:
                    final[row] = decoder.logits[row]
                if width > index:
                    decoder.lengths[row] += 1
                    decoder.produced[row] += 1
        logits = decoder.logits[:active]
        logits.copy_(final)
        if mask is not None:
            mask(logits)
        chosen = logits.argmax(-1)
        decoder.tokens[:active] = chosen
        decoder.tokens_host[:active] = chosen  # where the scheduler takes them (CPU: no copy)
        return chosen

    return wide_step


def _assert_valid(engine: NativeInternVLEngine, request: PreparedRequest, ids: list[int]) -> None:
    parsed = parse_answer(engine.tokenizer.decode(ids, skip_special_tokens=True))
    assert parsed.answer is not None, (request.request_id, parsed.error)
    assert request.answer_schema is not None
    validator = Draft202012Validator(request.answer_schema.json_schema)
    assert list(validator.iter_errors(parsed.answer)) == [], request.request_id


def test_stepping_inside_the_grammar_equals_the_static_engine(
    engine: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    expected = {r.request_id: engine.generate_token_ids([r])[0] for r in requests}
    scheduler = _scheduler(engine, forced_tokens=0)
    got = _drain(scheduler, requests)  # three requests, two slots: one joins mid-stream
    for request in requests:
        # The static engine's ids end with <|im_end|>; the slot engine stops before it.
        want = expected[request.request_id]
        assert got[request.request_id] == [t for t in want if t != scheduler.eos_id]
        _assert_valid(engine, request, got[request.request_id])
    assert scheduler.stats["forced_tokens"] == 0


def test_forced_runs_equal_feeding_the_same_tokens_one_by_one(
    engine: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    fast = _scheduler(engine)
    got = _drain(fast, requests)
    reference = _scheduler(engine)
    reference.decoder.wide_step = _stepwise(reference.decoder)  # type: ignore[method-assign]
    want = _drain(reference, requests)
    assert got == want
    for request in requests:
        _assert_valid(engine, request, got[request.request_id])
    answer_tokens = sum(len(ids) for ids in got.values())
    assert fast.stats["forced_tokens"] > 0
    # Forced tokens take no step of their own: far fewer steps than answer tokens.
    assert fast.stats["constrained_steps"] < answer_tokens - fast.stats["forced_tokens"] / 2


def test_free_rows_beside_constrained_rows_decode_as_alone(
    engine: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    free = _request("free", None, seed=9)
    reference = load_native(engine.config.model_path, decode="generate", max_new_tokens=40)
    alone = reference.generate_token_ids([free])[0]
    scheduler = _scheduler(engine)
    for request in requests[:1]:
        scheduler.add(request)
    scheduler.add(free, max_new_tokens=40)
    out: dict[str, list[int]] = {}
    while not scheduler.idle:
        ended, failed = scheduler.run_round()
        assert not failed
        out.update({c.request_id: list(c.token_ids) for _w, c in ended})
    assert out["free"] == [t for t in alone if t != scheduler.eos_id][:40]
    _assert_valid(engine, requests[0], out[requests[0].request_id])


def test_a_prompt_in_mixed_steps_goes_on_in_plain_chunks_once_rounds_are_constrained(
    engine: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    """A constrained request's arrival ends mixed steps; the prompt they carried goes on."""
    frees = [_request("free-1", None, seed=9), _request("free-2", None, seed=10)]
    reference = load_native(engine.config.model_path, decode="generate", max_new_tokens=40)
    alone = {r.request_id: reference.generate_token_ids([r])[0] for r in frees}
    constrained = requests[0]
    answer = engine.generate_token_ids([constrained])[0]
    scheduler = _scheduler(
        engine, slots=3, steps_per_round=2, forced_tokens=0, mixed_chunk_tokens=128
    )
    out: dict[str, list[int]] = {}

    def run_round() -> None:
        ended, failed = scheduler.run_round()
        assert not failed
        out.update({c.request_id: list(c.token_ids) for _w, c in ended})

    scheduler.add(frees[0], max_new_tokens=40)
    run_round()
    scheduler.add(frees[1], max_new_tokens=40)
    run_round()  # a free round: its two steps carry the first 256 prompt tokens
    work = scheduler.prefilling
    assert work is not None and work.done == 256 < len(work.ids)
    scheduler.add(constrained)
    while not scheduler.idle:
        run_round()
    for request in frees:
        want = [t for t in alone[request.request_id] if t != scheduler.eos_id][:40]
        assert out[request.request_id] == want, request.request_id
    assert out[constrained.request_id] == [t for t in answer if t != scheduler.eos_id]
    _assert_valid(engine, constrained, out[constrained.request_id])
    assert scheduler.stats["mixed_steps"] == 2 and scheduler.stats["constrained_steps"] > 0


def test_chunks_are_packed_row_after_row_with_padding_on_the_spare_row(
    engine: NativeInternVLEngine,
) -> None:
    decoder = _scheduler(engine, slots=4).decoder
    assert decoder.token_sizes[:8] == [1, 2, 3, 4, 6, 8, 12, 16]
    assert decoder.token_sizes[-1] == 4 * decoder.max_width
    size = decoder.load_chunks([[5, 6], [7], [8, 9, 10, 11, 12]])
    assert size == 8  # 8 real tokens: no padding
    packed = decoder.packed.tolist()
    assert packed[0][:8] == [5, 6, 7, 8, 9, 10, 11, 12]
    assert packed[1][:8] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert packed[2][:8] == [0, 1, 0, 0, 1, 2, 3, 4]
    assert packed[3][:4] == [0, 2, 3, 0] and packed[4][:4] == [2, 1, 5, 0]  # row 3: none
    size = decoder.load_chunks([[5], [], [6, 7, 8]])  # 4 tokens, rows up to 3 fed
    assert size == 4
    assert packed != decoder.packed.tolist()
    packed = decoder.packed.tolist()
    assert packed[1][:4] == [0, 2, 2, 2] and packed[4][:4] == [1, 0, 3, 0]
    size = decoder.load_chunks([[5, 6, 7], [8, 9]])  # 5 tokens: padded to 6 on the spare row
    assert size == 6 and decoder.packed[1, 5].item() == decoder.slots
    with pytest.raises(ValueError, match="chunks"):
        decoder.load_chunks([[1] * (decoder.max_width + 1)])
    with pytest.raises(ValueError, match="chunks"):
        decoder.load_chunks([[1]] * (decoder.slots + 1))


def _model_choices(
    engine: NativeInternVLEngine, request: PreparedRequest, ids: list[int]
) -> list[int]:
    """The model's own greedy choice at each answer position, fed the answer one token a pass."""
    decoder = _scheduler(engine, slots=1).decoder
    prompt = engine.encode_prompts([request])[0]
    features = engine.image_features([request])[0]
    flat = torch.cat([part.reshape(-1, part.shape[-1]) for part in features])
    choices = [int(decoder.prefill.prefill_rows([prompt], flat, [0])[0])]  # no mask: its own
    decoder.activate_rows(0, [len(prompt)], torch.tensor([ids[0]]), [0])
    for token in ids[:-1]:
        decoder.forward_packed(decoder.load_chunks([[token]]))
        choices.append(int(decoder.logits[0].argmax()))
        decoder.lengths[0] += 1
    return choices


def test_following_the_model_takes_its_own_choice_wherever_the_grammar_allows_it(
    engine: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    scheduler = _scheduler(engine, follow_model=True)
    got = _drain(scheduler, requests)
    assert scheduler.stats["forced_tokens"] > 0
    cache = GrammarCache(
        engine.tokenizer, vocab_size=scheduler.vocab_size, stop_id=scheduler.eos_id
    )
    with torch.inference_mode():
        for request in requests:
            ids = got[request.request_id]
            _assert_valid(engine, request, ids)
            assert request.answer_schema is not None
            matcher = cache.matcher(request.answer_schema)
            for position, (token, choice) in enumerate(
                zip(ids, _model_choices(engine, request, ids), strict=True)
            ):
                if token != choice:  # only where the grammar refuses the model's own token
                    assert not matcher.accept_token(choice), (request.request_id, position)
                assert matcher.accept_token(token), (request.request_id, position)


def test_runs_taken_back_for_the_model_keep_rows_and_answers_consistent(
    engine: NativeInternVLEngine, requests: list[PreparedRequest]
) -> None:
    """A stand-in "model" that agrees with every forced token but splits one finer."""
    scheduler = _scheduler(engine, follow_model=True)
    decoder = scheduler.decoder
    tokenizer = engine.tokenizer
    real = decoder.stepped_positions
    departures = [0]

    def finer_split(size: int) -> list[int]:
        positions = real(size)
        packed = decoder.packed.tolist()
        for start, width in zip(
            packed[3][: decoder.slots], packed[4][: decoder.slots], strict=True
        ):
            if width < 2:
                continue
            forced = packed[0][start + 1 : start + width]
            positions[start : start + width - 1] = forced
            for index, piece in enumerate(tokenizer.convert_ids_to_tokens(forced)):
                if len(piece) > 1 and departures[0] < 40:  # the same text, split finer
                    positions[start + index] = tokenizer.convert_tokens_to_ids(piece[0])
                    departures[0] += 1
                    break
        return positions

    decoder.stepped_positions = finer_split  # type: ignore[method-assign]
    for request in requests:
        scheduler.add(request)
    out: dict[str, list[int]] = {}
    while not scheduler.idle:
        ended, failed = scheduler.run_round()
        assert not failed
        out.update({c.request_id: list(c.token_ids) for _w, c in ended})
        print("DEBUG ended", [(c.request_id, c.finish, len(c.token_ids)) for _w, c in ended])
        for row, work in enumerate(scheduler.rows):  # host and device agree on every row
            assert int(decoder.lengths[row]) == len(work.ids) + work.fed
    assert scheduler.stats["forced_taken_back"] > 0
    for request in requests:
        print(
            "DEBUG",
            request.request_id,
            len(out[request.request_id]),
            engine.tokenizer.decode(out[request.request_id])[-300:],
        )
        _assert_valid(engine, request, out[request.request_id])
