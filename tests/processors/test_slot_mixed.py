"""Mixed steps on the tiny random InternVL (CPU, float32): a decode step carrying a chunk.

One mixed step must do what a plain decode step and a chunked prefill do apart: the
same tokens and row state, the same staging keys and values, the same first token after
a prompt's last chunk (padded to its width).
"""

from __future__ import annotations

import pytest
import torch

from processors.internvl import NativeInternVLEngine, StaticGreedyDecoder
from processors.slot_decoder import SlotDecoder
from processors.slot_mixed import MixedStep, chunk_widths
from tests.support.tiny_internvl import TinyCheckpoints, load_native


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: TinyCheckpoints) -> NativeInternVLEngine:
    return load_native(tiny_checkpoints.native(), max_new_tokens=8)


def decoder_with_rows(base: StaticGreedyDecoder, prompts: list[list[int]]) -> SlotDecoder:
    """A decoder whose rows [0, len(prompts)) decode `prompts` (prefilled, activated)."""
    decoder = SlotDecoder(base, slots=4, context=512, steps_per_round=4, stage_rows=2)
    with torch.inference_mode():
        first = decoder.prefill.prefill_rows(prompts, None, [0] * len(prompts))
        decoder.activate_rows(0, [len(ids) for ids in prompts], first, [0] * len(prompts))
        decoder.begin_round()
    return decoder


def test_chunk_widths_are_powers_of_two_from_128_then_the_chunk() -> None:
    assert chunk_widths(1024) == [128, 256, 512, 1024]
    assert chunk_widths(300) == [128, 256, 300]
    assert chunk_widths(96) == [96]


def test_a_mixed_step_is_a_plain_step_and_a_chunk_prefill(engine: NativeInternVLEngine) -> None:
    generator = torch.Generator().manual_seed(7)
    rows = [torch.randint(10, 1000, (n,), generator=generator).tolist() for n in (37, 90)]
    prompt = torch.randint(10, 1000, (150,), generator=generator).tolist()
    assert engine.decoder is not None
    plain, mixed = decoder_with_rows(engine.decoder, rows), decoder_with_rows(engine.decoder, rows)
    mixer = MixedStep(mixed, 128, compile_layers=False)
    assert mixer.widths == [128] and mixer.fits(384) and not mixer.fits(385)
    expected_first = None
    with torch.inference_mode():
        for start in (0, 128):  # a full chunk, then the last 22 tokens padded to 128
            chunk = prompt[start : start + 128]
            last = start + len(chunk) == len(prompt)
            plain.step(2)
            expected_first = plain.prefill.prefill_chunk(
                torch.tensor([chunk]), start, None, last, min_new_tokens=0
            )
            mixer.load(chunk, start, None)
            mixer.step(2)
        first = mixer.first_token(min_new=0)
    assert expected_first is not None
    for state in ("round_out", "tokens", "lengths", "produced"):
        assert torch.equal(getattr(mixed, state), getattr(plain, state)), state
    assert mixed.lengths[:2].tolist() == [37 + 2, 90 + 2]
    columns = len(prompt)
    for layer in range(len(plain.prefill.keys)):
        for got, want in (
            (mixed.prefill.keys[layer], plain.prefill.keys[layer]),
            (mixed.prefill.values[layer], plain.prefill.values[layer]),
        ):
            torch.testing.assert_close(got[0, :, :columns], want[0, :, :columns])
    torch.testing.assert_close(mixed.kv[:, :, :2], plain.kv[:, :, :2])
    assert torch.equal(first, expected_first)
    # `<|im_end|>` stays suppressed while a request needs more tokens.
    logits = mixer.logits.clone()
    logits[0, mixed.eos_id] = logits.max() + 1
    mixer.logits.copy_(logits)
    assert int(mixer.first_token(min_new=0)) == mixed.eos_id
    assert int(mixer.first_token(min_new=3)) != mixed.eos_id


def test_chunks_must_fit_their_width_and_the_context(engine: NativeInternVLEngine) -> None:
    assert engine.decoder is not None
    decoder = decoder_with_rows(engine.decoder, [[11, 12, 13]])
    with pytest.raises(ValueError, match="chunk must be"):
        MixedStep(decoder, 512, compile_layers=False)
    mixer = MixedStep(decoder, 256, compile_layers=False)
    with pytest.raises(ValueError, match="a chunk of 257 tokens"):
        mixer.load([5] * 257, 0, None)
    with torch.inference_mode():
        mixer.load([5] * 129, 0, None)
    assert mixer.loaded == 256  # the smallest captured width that holds it
