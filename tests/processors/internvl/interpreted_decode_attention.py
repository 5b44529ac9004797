"""Checks of the split-key decode attention kernel under Triton's interpreter (CPU).

Not collected by default (no `test_` prefix): `test_decode_attention.py` runs this file
in a child pytest with `TRITON_INTERPRET=1` set before Triton is imported, which makes
every `triton.jit` function (Triton's own library functions too) run on the CPU. So the
very kernel the GPU runs is checked against a masked `scaled_dot_product_attention`
reference and, through the decoder and the slot engine's mixed step, against the dense
decode path.
"""

from __future__ import annotations

import os

import pytest
import torch

from processors.internvl import SplitKeyAttention, StaticGreedyDecoder, chunk_attention
from processors.slot_mixed import MixedStep
from tests.processors.test_slot_mixed import decoder_with_rows
from tests.support.tiny_internvl import build_tokenizer, tiny_native_model

pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run with TRITON_INTERPRET=1 (see test_decode_attention.py)")


def _case(
    batch: int, kv_heads: int, group: int, head_dim: int, length: int, seed: int
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads, group, head_dim, generator=generator)
    keys = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    values = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    return query, keys, values


def _visible(lengths: torch.Tensor, prompt_end: int, column: int, length: int) -> torch.Tensor:
    columns = torch.arange(length)[None, :]
    return (columns < lengths[:, None]) | ((columns >= prompt_end) & (columns <= column))


def _reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    mask = visible[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scale
    )


@pytest.mark.parametrize(("splits", "block_n"), [(0, 16), (1, 16), (2, 16), (4, 32), (8, 16)])
@pytest.mark.parametrize("column", [64, 81])
def test_matches_masked_sdpa(splits: int, block_n: int, column: int) -> None:
    """Rows of full, partial and one-token prompts; first and later generated columns.

    Splits 0 (auto: 2 here, 6 programs on the interpreter's 8 multiprocessors) go
    through the merge kernel; 8 leave the short rows' later splits with no column, which
    the merge must skip.
    """
    query, keys, values = _case(3, 2, 7, 16, 96, seed=splits * 100 + column)
    lengths = torch.tensor([64, 30, 1])
    prompt_end = 64
    expected = _reference(query, keys, values, _visible(lengths, prompt_end, column, 96), 0.3)
    attention = SplitKeyAttention(splits=splits, block_n=block_n)
    out = attention(
        query, keys, values, lengths, torch.tensor(prompt_end), torch.tensor(column), 0.3
    )
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reads_only_the_visible_columns() -> None:
    """Padding and not-yet-generated columns hold NaN: the output must not see them."""
    query, keys, values = _case(2, 2, 3, 32, 80, seed=7)
    lengths = torch.tensor([40, 17])
    visible = _visible(lengths, 48, 55, 80)
    expected = _reference(query, keys, values, visible, 0.2)
    hidden = ~visible[:, None, :, None]
    poisoned_keys = keys.masked_fill(hidden, float("nan"))
    poisoned_values = values.masked_fill(hidden, float("nan"))
    for splits in (1, 3):
        out = SplitKeyAttention(splits=splits, block_n=16)(
            query, poisoned_keys, poisoned_values, lengths, torch.tensor(48), torch.tensor(55), 0.2
        )
        assert not out.isnan().any()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decoder_with_split_attention_matches_dense_decoder() -> None:
    """The whole static decode path gives the same greedy ids with either attention."""
    model = tiny_native_model(build_tokenizer())
    options = {"eos_id": 0, "max_new_tokens": 6, "length_bucket": 16, "cuda_graphs": False}
    dense = StaticGreedyDecoder(model, **options)  # type: ignore[arg-type]
    split = StaticGreedyDecoder(model, split_attention=True, attention_splits=2, **options)  # type: ignore[arg-type]
    assert split.split_attention and not dense.split_attention
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(10, 1000, (3, 21), generator=generator)
    lengths = torch.tensor([21, 13, 5])
    results = []
    with torch.inference_mode():
        for decoder in (dense, split):
            session = decoder.session(3, 21)
            first = torch.cat(
                [  # two prefill calls of their own widths, as the engine makes them
                    decoder.prefill(session, 0, input_ids[:2], lengths[:2], None),
                    decoder.prefill(session, 2, input_ids[2:, :5], lengths[2:], None),
                ]
            )
            results.append(decoder.decode(session, first))
    assert results[0] == results[1]
    assert all(len(row) == 6 for row in results[0])


def test_a_mixed_step_on_the_kernels_equals_one_on_dense_attention() -> None:
    """`MixedStep`'s GPU path: the split-key kernel for the rows, `chunk_attention` (64-query
    blocks, every staging row passed) for the chunk, against masked SDPA for both."""
    model = tiny_native_model(build_tokenizer())
    options = {"eos_id": 0, "max_new_tokens": 6, "length_bucket": 16, "cuda_graphs": False}
    bases = (
        StaticGreedyDecoder(model, **options),  # type: ignore[arg-type]
        StaticGreedyDecoder(model, split_attention=True, attention_splits=2, **options),  # type: ignore[arg-type]
    )
    generator = torch.Generator().manual_seed(5)
    rows = [torch.randint(10, 1000, (n,), generator=generator).tolist() for n in (37, 90)]
    prompt = torch.randint(10, 1000, (150,), generator=generator).tolist()
    runs = []
    with torch.inference_mode():
        for base in bases:
            decoder = decoder_with_rows(base, rows)
            mixer = MixedStep(decoder, 128, compile_layers=False)
            for start in (0, 128):  # a full chunk, then 22 tokens padded to 128
                mixer.load(prompt[start : start + 128], start, None)
                mixer.step(2)
            runs.append((decoder, mixer, mixer.first_token(min_new=0)))
    (dense, dense_mixer, dense_first), (split, split_mixer, split_first) = runs
    assert split.base.split_key_attention is not None and dense.base.split_key_attention is None
    assert torch.equal(split.tokens, dense.tokens) and torch.equal(split_first, dense_first)
    assert torch.equal(split.lengths, dense.lengths)
    torch.testing.assert_close(split_mixer.logits, dense_mixer.logits, atol=1e-4, rtol=1e-4)
    for layer in range(len(dense.prefill.keys)):
        torch.testing.assert_close(
            split.prefill.keys[layer][0, :, :150], dense.prefill.keys[layer][0, :, :150]
        )
    torch.testing.assert_close(split.kv[:, :, :2], dense.kv[:, :, :2])


def _chunk_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    widths: list[int],
    lengths: list[int],
    scale: float,
) -> torch.Tensor:
    """Each packed token attends to its row's columns up to its own, one SDPA per token."""
    group = query.shape[1] // keys.shape[1]
    out = torch.zeros_like(query)
    token = 0
    for row, (width, length) in enumerate(zip(widths, lengths, strict=True)):
        for offset in range(width):
            seen = length + offset + 1
            out[token] = torch.nn.functional.scaled_dot_product_attention(
                query[token][:, None, :],
                keys[row, :, :seen].repeat_interleave(group, 0),
                values[row, :, :seen].repeat_interleave(group, 0),
                scale=scale,
            )[:, 0]
            token += 1
    return out


@pytest.mark.parametrize("block_n", [16, 32])
def test_chunk_attention_matches_per_token_sdpa(block_n: int) -> None:
    """Rows of wide, one-token and empty chunks, short and long histories, spare tokens."""
    generator = torch.Generator().manual_seed(block_n)
    widths, lengths = [5, 1, 0, 3], [40, 0, 7, 77]
    context, kv_heads, group, head_dim = 96, 2, 7, 16
    keys = torch.randn(5, kv_heads, context, head_dim, generator=generator)  # a spare row
    values = torch.randn(5, kv_heads, context, head_dim, generator=generator)
    tokens = sum(widths) + 2  # two spare tokens, as padding to a captured size leaves
    query = torch.randn(tokens, kv_heads * group, head_dim, generator=generator)
    starts = torch.tensor([0, 5, 6, 6])
    expected = _chunk_reference(query, keys, values, widths, lengths, 0.25)
    # Columns past each row's chunk hold NaN: no token may read them.
    for row, (width, length) in enumerate(zip(widths, lengths, strict=True)):
        keys[row, :, length + width :] = float("nan")
        values[row, :, length + width :] = float("nan")
    out = chunk_attention(
        query, keys, values, starts, torch.tensor(widths), torch.tensor(lengths), 0.25,
        max_width=5, block_n=block_n,
    )  # fmt: skip
    assert out.shape == query.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out[: sum(widths)], expected[: sum(widths)], atol=1e-5, rtol=1e-5)
    assert not out[sum(widths) :].any()  # tokens of no row stay zero


@pytest.mark.parametrize(("block_m", "length"), [(64, 30), (128, 0), (16, 70)])
def test_a_prompt_chunk_with_wide_query_blocks_matches_per_token_sdpa(
    block_m: int, length: int
) -> None:
    """One row's 40-token chunk (a prompt's, as a mixed step carries) after `length` columns.

    Blocks of `block_m` queries hold several tokens of each head group, so a block's
    tokens see different columns (the causal limit inside the block) and the last block
    is part padding.
    """
    generator = torch.Generator().manual_seed(block_m + length)
    width, context, kv_heads, group, head_dim = 40, 128, 2, 7, 16
    keys = torch.randn(2, kv_heads, context, head_dim, generator=generator)
    values = torch.randn(2, kv_heads, context, head_dim, generator=generator)
    query = torch.randn(48, kv_heads * group, head_dim, generator=generator)  # 8 pads
    expected = _chunk_reference(query, keys, values, [width], [length], 0.3)
    keys[0, :, length + width :] = float("nan")
    values[0, :, length + width :] = float("nan")
    out = chunk_attention(
        query, keys, values, torch.tensor([0]), torch.tensor([width]), torch.tensor([length]),
        0.3, max_width=48, block_m=block_m,
    )  # fmt: skip
    assert not out.isnan().any()
    torch.testing.assert_close(out[:width], expected[:width], atol=1e-5, rtol=1e-5)
    assert not out[width:].any()
