"""The slot engine's prefill and row moves on the tiny random InternVL (CPU, float32).

Padding a group to its captured (rows, width) must change nothing a real token sees;
the moves of a round's leaving rows, done in one copy, must equal moving them one by one.
"""

from __future__ import annotations

import pytest
import torch

from processors.internvl import NativeInternVLEngine
from processors.slot_decoder import SlotDecoder
from processors.slot_prefill import WIDTH_BUCKET, StagedPrefill, row_sizes, width_ladder
from tests.support.tiny_internvl import TinyCheckpoints, load_native


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: TinyCheckpoints) -> NativeInternVLEngine:
    return load_native(tiny_checkpoints.native(), max_new_tokens=8)


def _decoder(engine: NativeInternVLEngine, slots: int = 6) -> SlotDecoder:
    assert engine.decoder is not None
    return SlotDecoder(engine.decoder, slots=slots, context=640, steps_per_round=2, stage_rows=4)


def test_ladders() -> None:
    assert row_sizes(8) == [1, 2, 4, 8]
    assert row_sizes(6) == [1, 2, 4, 6]
    assert width_ladder(640, bucket=256) == [256, 512, 640]
    assert width_ladder(256, bucket=256) == [256]
    assert width_ladder(640) == [*range(WIDTH_BUCKET, 640, WIDTH_BUCKET), 640]


def test_unpadded_rows_is_the_largest_row_size_not_above_the_count(
    engine: NativeInternVLEngine,
) -> None:
    assert engine.decoder is not None
    prefill = StagedPrefill(engine.decoder, rows=6, context=512, cuda_graphs=False)
    assert [prefill.unpadded_rows(n) for n in range(1, 8)] == [1, 2, 2, 4, 4, 6, 6]


def test_captured_shapes_are_bounded_but_every_width_has_one_row(
    engine: NativeInternVLEngine,
) -> None:
    assert engine.decoder is not None
    prefill = StagedPrefill(
        engine.decoder, rows=8, context=2048, cuda_graphs=False, graph_tokens=1024
    )
    assert all(rows * width <= 1024 or rows == 1 for rows, width in prefill.graph_shapes)
    assert {width for rows, width in prefill.graph_shapes if rows == 1} == set(prefill.widths)
    assert (4, 256) in prefill.graph_shapes and (4, 512) not in prefill.graph_shapes


def test_a_padded_group_equals_each_prompt_alone_unpadded(engine: NativeInternVLEngine) -> None:
    decoder = _decoder(engine)
    prefill = decoder.prefill
    generator = torch.Generator().manual_seed(7)
    vocab = 1000  # ordinary text ids of the tiny model's vocabulary
    prompts = [
        torch.randint(10, vocab, (length,), generator=generator).tolist()
        for length in (300, 17, 123)
    ]
    # 3 rows of <= 300 tokens take the 4-row shape of the next width of the ladder.
    assert prefill.shape_for(3, 300) == (4, -(-300 // WIDTH_BUCKET) * WIDTH_BUCKET)
    with torch.inference_mode():
        together = prefill.prefill_rows(prompts, None, [0, 0, 0])
        keys = [prefill.keys[layer][:3].clone() for layer in range(len(prefill.keys))]
        for row, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            alone = prefill.prefill_chunk(ids, 0, None, last=True, min_new_tokens=0)
            assert int(alone[0]) == int(together[row])
            for layer, stacked in enumerate(keys):
                torch.testing.assert_close(
                    stacked[row, :, : len(prompt)], prefill.keys[layer][0, :, : len(prompt)]
                )


def test_min_new_tokens_suppresses_the_end_token_of_its_row_only(
    engine: NativeInternVLEngine,
) -> None:
    prefill = _decoder(engine).prefill
    prompt = list(range(20, 60))

    def favour_the_end(logits: torch.Tensor) -> None:  # applied before the suppression
        logits[:, prefill.eos_id] = 1e9

    with torch.inference_mode():
        first = prefill.prefill_rows([prompt, prompt], None, [1, 0], logits_mask=favour_the_end)
    assert int(first[0]) != prefill.eos_id
    assert int(first[1]) == prefill.eos_id
    with pytest.raises(ValueError, match="prompts"):
        prefill.prefill_rows([prompt] * 5, None, [0] * 5)  # 4 staging rows
    with pytest.raises(ValueError, match="prompts"):
        prefill.prefill_rows([list(range(prefill.context + 1))], None, [0])  # past the context


def test_moves_of_a_round_in_one_copy_equal_moving_one_by_one(
    engine: NativeInternVLEngine,
) -> None:
    decoder = _decoder(engine)
    with torch.no_grad():
        decoder.kv.copy_(torch.randn(decoder.kv.shape, generator=torch.Generator().manual_seed(3)))
    before = decoder.kv.clone()
    for row in range(5):
        decoder.lengths[row] = 10 + row
        decoder.tokens[row] = 100 + row
        decoder.active[row] = 1
    # Rows 0 and 2 leave with 5 rows active: row 4 moves to 2, then row 3 to 0.
    decoder.move_rows([(3, 0), (4, 2)], columns=32, keep=3)
    for target, source in ((0, 3), (2, 4), (1, 1)):
        torch.testing.assert_close(decoder.kv[:, :, target, :, :32], before[:, :, source, :, :32])
        assert int(decoder.lengths[target]) == 10 + source
        assert int(decoder.tokens[target]) == 100 + source
    assert decoder.lengths[3:].tolist() == [0] * (decoder.slots - 2)
    assert decoder.active.tolist() == [1, 1, 1, 0, 0, 0]
