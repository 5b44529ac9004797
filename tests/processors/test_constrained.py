"""Constrained decoding on the tiny random InternVL (CPU): every answer is valid at once,
and constrained greedy is greedy over the grammar's tokens."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch
from jsonschema import Draft202012Validator

from processors.answer_parsing import parse_answer
from processors.answer_schema import FieldLimits, answer_schema
from processors.constrained import GrammarCache, forced_tokens, model_departure
from processors.decision import unknown_recommendation
from processors.inference import PreparedRequest
from processors.internvl import EngineConfig, NativeInternVLEngine, load_engine
from processors.prompt import build_prompt, parse_questions
from tests.processors.test_answer_schema import QUESTION_SETS
from tests.support.tiny_internvl import TinyCheckpoints, load_native

MAX_NEW = 2500
#: Short free strings keep the random model's answers (which fill every string to its
#: bound) a few hundred steps long on CPU.
LIMITS = FieldLimits(analysis=6, evidence=6, text_result=4)


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: TinyCheckpoints) -> NativeInternVLEngine:
    config = EngineConfig(tiny_checkpoints.native(), max_new_tokens=MAX_NEW, grammar_threads=2)
    loaded = load_engine(config)
    assert isinstance(loaded, NativeInternVLEngine)
    return loaded


def _request(name: str, questions: list[dict[str, Any]], seed: int) -> PreparedRequest:
    parsed = parse_questions(json.dumps(questions, ensure_ascii=False))
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(seed))
    prompt = build_prompt("Running shoe «Größe 43»", parsed, 1, 1)
    return PreparedRequest(
        name, 1, prompt, (1, 1), pixels, answer_schema=answer_schema(parsed, LIMITS)
    )


def _sets() -> dict[str, list[dict[str, Any]]]:
    sets = dict(QUESTION_SETS)
    sets["many questions"] = QUESTION_SETS["many questions"][:8]  # CPU time
    return sets


def test_every_answer_is_valid_on_the_first_attempt(engine: NativeInternVLEngine) -> None:
    sets = _sets()
    batch = [_request(name, qs, seed) for seed, (name, qs) in enumerate(sets.items())]
    texts = engine.generate(batch)
    for request, text in zip(batch, texts, strict=True):
        parsed = parse_answer(text)
        assert parsed.answer is not None, (request.request_id, parsed.error, text[-300:])
        assert unknown_recommendation(parsed.answer) is None
        assert request.answer_schema is not None
        strict = Draft202012Validator(request.answer_schema.json_schema)
        assert list(strict.iter_errors(parsed.answer)) == [], request.request_id
    assert engine.grammars is not None and engine.grammars.compilations == len(sets)
    # The same question set again is served by the cached grammar.
    engine.generate(batch[:1])
    assert engine.grammars.compilations == len(sets)


def test_free_rows_beside_constrained_rows_decode_as_before(
    engine: NativeInternVLEngine,
) -> None:
    constrained = _request("c", QUESTION_SETS["one boolean"], seed=4)
    free = PreparedRequest("f", 1, constrained.prompt, (1, 1), constrained.pixel_values)
    answer = engine.generate_token_ids([constrained])[0]
    # A random model's free row runs to the budget: on the same model, a budget just past
    # the constrained answer keeps the free rows a few hundred steps long, not MAX_NEW.
    config = dataclasses.replace(engine.config, max_new_tokens=len(answer) + 1)
    short = NativeInternVLEngine.from_model(config, engine.model, engine.tokenizer)
    alone = short.generate_token_ids([free])[0]
    mixed = short.generate_token_ids([constrained, free])
    assert mixed[1] == alone
    assert mixed[0] == answer  # the constrained row is unchanged by its free neighbour
    assert parse_answer(engine.tokenizer.decode(mixed[0])).ok


def test_constrained_greedy_is_the_masked_argmax_of_the_model(
    engine: NativeInternVLEngine,
) -> None:
    """Each chosen id is the argmax of the model's own logits over the grammar's tokens,
    so wherever the model's unmasked argmax is inside the grammar, the two agree."""
    request = _request("g", QUESTION_SETS["mixed types"], seed=7)
    ids = engine.generate_token_ids([request])[0]
    prompt = engine.prompt_ids(request)
    assert request.answer_schema is not None and engine.grammars is not None
    with torch.inference_mode():
        logits = (
            engine.model(
                input_ids=torch.tensor([prompt + ids]),
                pixel_values=request.pixel_values.to(engine.dtype),
            )
            .logits[0, len(prompt) - 1 : len(prompt) + len(ids) - 1]
            .float()
        )
    matcher = engine.grammars.matcher(request.answer_schema)
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(1, engine.grammars.vocab_size)
    for step, token in enumerate(ids):
        matcher.fill_next_token_bitmask(bitmask)
        row = logits[step : step + 1].clone()
        free_choice = int(row.argmax())
        xgrammar.apply_token_bitmask_inplace(row, bitmask)
        assert int(row.argmax()) == token, step
        if (int(bitmask[0, free_choice // 32]) >> (free_choice % 32)) & 1:
            assert token == free_choice, step  # the model's own choice was allowed
        assert matcher.accept_token(token)
    assert matcher.is_completed()
    assert parse_answer(engine.tokenizer.decode(ids)).ok


def test_off_switch_decodes_freely(tiny_checkpoints: TinyCheckpoints) -> None:
    path = tiny_checkpoints.native()
    free = load_native(path, max_new_tokens=16, constrained_decoding=False)
    # The same weights without a second load: only the config's switch differs.
    on = NativeInternVLEngine.from_model(
        EngineConfig(path, max_new_tokens=16), free.model, free.tokenizer
    )
    request = _request("o", QUESTION_SETS["one boolean"], seed=2)
    unconstrained = PreparedRequest("o", 1, request.prompt, (1, 1), request.pixel_values)
    assert free.generate_token_ids([request]) == on.generate_token_ids([unconstrained])
    assert on.generate_token_ids([request]) != free.generate_token_ids([request])


def test_rows_are_filled_advanced_and_reset_one_by_one(engine: NativeInternVLEngine) -> None:
    """The per-row API a slot engine uses: fill a subset of rows, advance rows after the
    argmax, give a row to a new request; a complete answer may only end."""
    from processors.constrained import ConstrainedRows, GrammarCache
    from tests.processors.test_answer_schema import _Generator

    grammars = GrammarCache(
        engine.tokenizer,
        vocab_size=int(engine.model.lm_head.out_features),
        stop_id=int(engine.tokenizer.convert_tokens_to_ids("<|im_end|>")),
        threads=2,
    )
    first = answer_schema(parse_questions(json.dumps(QUESTION_SETS["mixed types"])), LIMITS)
    other = answer_schema(parse_questions(json.dumps(QUESTION_SETS["one boolean"])), LIMITS)
    rows = ConstrainedRows(grammars, [first, None, other])
    rows.fill([0, 2])
    assert bool((rows.bitmask[1] == -1).all())  # a free row allows everything
    assert not bool((rows.bitmask[0] == -1).all())

    class _NoEscapes(_Generator):
        # xgrammar's bounded strings admit no escape sequence (see processors/constrained.py)
        ALPHABET = "ab Z09.,;:!?'-_/()é深🎨"

    answer = _NoEscapes(seed=5).instance(first.json_schema)
    text = json.dumps(answer, indent=2, ensure_ascii=False)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    opening = rows.bitmask[0].clone()
    for token in ids:
        rows.fill([0])
        assert (int(rows.bitmask[0, token // 32]) >> (token % 32)) & 1, token
        rows.advance([token], [0])
    assert not rows.done[0]
    rows.fill([0])
    stop = grammars.stop_id
    allowed = [
        t for t in range(grammars.vocab_size) if (int(rows.bitmask[0, t // 32]) >> (t % 32)) & 1
    ]
    assert allowed == [stop]
    rows.advance([stop], [0])
    assert rows.done[0] and rows.active  # row 2 still constrained
    rows.reset_row(2, first)
    rows.fill([2])
    assert bool((rows.bitmask[2] == opening).all())
    rows.reset_row(2, None)
    assert not rows.active


def test_a_departure_is_the_first_choice_the_grammar_also_allows(
    engine: NativeInternVLEngine,
) -> None:
    tokenizer = engine.tokenizer
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert engine.decoder is not None
    vocab = int(engine.decoder.lm_head.out_features)
    cache = GrammarCache(tokenizer, vocab_size=vocab, stop_id=stop)
    schema = answer_schema(parse_questions(json.dumps(QUESTION_SETS["one boolean"])), LIMITS)
    matcher = cache.matcher(schema)
    forced = forced_tokens(matcher, 64)  # the answer's opening, as xgrammar splits it
    pieces = tokenizer.convert_ids_to_tokens(forced)
    at = next(i for i, piece in enumerate(pieces) if len(piece) > 1)
    shorter = tokenizer.convert_tokens_to_ids(pieces[at][0])  # the same text, split finer
    outside = tokenizer.convert_tokens_to_ids("zz")
    assert model_departure(matcher, forced, forced) is None  # the model agrees: no departure
    assert model_departure(matcher, forced, [*forced[:at], outside, *forced[at + 1 :]]) is None
    assert model_departure(matcher, forced, [*forced[:at], shorter, *forced[at + 1 :]]) == (
        at,
        shorter,
    )
    # Left after forced[:at]: the model's token is the next one the grammar takes.
    assert matcher.accept_token(shorter)
