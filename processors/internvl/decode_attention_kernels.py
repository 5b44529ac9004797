"""Triton kernels of `processors.internvl.decode_attention` (imported only where Triton runs)."""

import triton
import triton.language as tl


@triton.jit
def attend_range(
    q,
    key_base,
    value_base,
    lo,
    hi,
    shift,
    best,
    total_weight,
    acc,
    stride_kl,
    stride_vl,
    scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Fold the visible columns [lo, hi) into a running (best, total_weight, acc) softmax.

    Returns the updated (best, total_weight, acc); `MASKED` handles a partial last block.
    """
    # Visible columns [lo, hi) live at cache columns [lo + shift, hi + shift): affine
    # addresses, so the loads vectorise and pipeline. Unmasked calls cover whole blocks
    # only (no bounds checks in the hot loop); the masked call takes the last partial one.
    # Scores are in base 2 (exp2 is one instruction); `scale_log2` folds in log2(e).
    dims = tl.arange(0, HEAD_DIM)
    for block in range(lo, hi, BLOCK_N):
        visible = block + tl.arange(0, BLOCK_N)
        key_pointers = key_base + (visible + shift)[:, None] * stride_kl + dims[None, :]
        value_pointers = value_base + (visible + shift)[:, None] * stride_vl + dims[None, :]
        if MASKED:
            valid = visible < hi
            k = tl.load(key_pointers, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(key_pointers)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if MASKED:
            scores = tl.where(valid[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp2(best - new_best)
        weights = tl.exp2(scores - new_best[:, None])
        total_weight = total_weight * rescale + tl.sum(weights, 1)
        if MASKED:  # noqa: SIM108 (a Triton constexpr branch, not a runtime one)
            v = tl.load(value_pointers, mask=valid[:, None], other=0.0)
        else:
            v = tl.load(value_pointers)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
    return best, total_weight, acc


@triton.jit
def partial_attention(
    query,
    keys,
    values,
    prompt_lengths,
    prompt_end_ptr,
    column_ptr,
    out,
    out_acc,
    out_max,
    out_sum,
    stride_qb,
    stride_qh,
    stride_qg,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    scale_log2,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (row, key/value head) program's share (split `program_id(1)`) of the attention.

    With one split it writes the normalised output to `out`; with several, each writes its
    unnormalised sum and base-2 maximum to `out_acc`/`out_max`/`out_sum` for the merge in
    `processors.internvl.decode_attention.split_key_attention`.
    """
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    row = row_head // KV_HEADS
    head = row_head % KV_HEADS
    prompt_length = tl.load(prompt_lengths + row)
    prompt_end = tl.load(prompt_end_ptr)
    column = tl.load(column_ptr)
    # Visible columns, numbered 0..total-1: the prompt, then the generated tokens.
    total = prompt_length + column + 1 - prompt_end
    per_split = tl.cdiv(tl.cdiv(total, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    stop = tl.minimum(start + per_split, total)

    groups = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        query + row * stride_qb + head * stride_qh + groups[:, None] * stride_qg + dims[None, :],
        mask=groups[:, None] < GROUP,
        other=0.0,
    )
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total_weight = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    key_base = keys + row * stride_kb + head * stride_kh
    value_base = values + row * stride_vb + head * stride_vh
    # The prompt's columns, then the generated ones (shifted past the padding).
    prompt_stop = tl.minimum(stop, prompt_length)
    whole = start + tl.maximum(prompt_stop - start, 0) // BLOCK_N * BLOCK_N
    best, total_weight, acc = attend_range(
        q, key_base, value_base, start, whole, 0, best, total_weight, acc,
        stride_kl, stride_vl, scale_log2, HEAD_DIM, BLOCK_N, PRECISION, False,
    )  # fmt: skip
    best, total_weight, acc = attend_range(
        q, key_base, value_base, whole, prompt_stop, 0, best, total_weight, acc,
        stride_kl, stride_vl, scale_log2, HEAD_DIM, BLOCK_N, PRECISION, True,
    )  # fmt: skip
    generated_start = tl.maximum(start, prompt_length)
    shift = prompt_end - prompt_length
    whole = generated_start + tl.maximum(stop - generated_start, 0) // BLOCK_N * BLOCK_N
    best, total_weight, acc = attend_range(
        q, key_base, value_base, generated_start, whole, shift, best, total_weight, acc,
        stride_kl, stride_vl, scale_log2, HEAD_DIM, BLOCK_N, PRECISION, False,
    )  # fmt: skip
    best, total_weight, acc = attend_range(
        q, key_base, value_base, whole, stop, shift, best, total_weight, acc,
        stride_kl, stride_vl, scale_log2, HEAD_DIM, BLOCK_N, PRECISION, True,
    )  # fmt: skip
    if SPLITS == 1:  # one program saw every column: normalise and write the output
        result = acc / total_weight[:, None]
        offsets = (row_head * GROUP + groups[:, None]) * HEAD_DIM + dims[None, :]
        tl.store(out + offsets, result.to(out.dtype.element_ty), mask=groups[:, None] < GROUP)
    else:
        slot = row_head * SPLITS + split
        tl.store(out_acc + (slot * GROUP_PAD + groups[:, None]) * HEAD_DIM + dims[None, :], acc)
        tl.store(out_max + slot * GROUP_PAD + groups, best)
        tl.store(out_sum + slot * GROUP_PAD + groups, total_weight)


@triton.jit
def chunk_attention_kernel(
    query,
    keys,
    values,
    starts,
    widths,
    lengths,
    out,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_ot,
    stride_oh,
    scale_log2,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    QUERY_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (row, key/value head, query block) program of a packed chunk's attention.

    Row `row` feeds `widths[row]` tokens, packed at `starts[row]` in `query` and `out`
    (token, head, dim); its cache holds `lengths[row]` earlier columns, then the chunk's
    own keys. The row's queries are numbered m = token * GROUP + g (head `head * GROUP +
    g`); block b takes m in [b * BLOCK_M, (b + 1) * BLOCK_M), so a one-token chunk is one
    block, as in `partial_attention`, and blocks past a row's chunk exit at once. Token t
    sees columns [0, length + t]. A row's blocks are adjacent program ids, so they read
    its keys and values at about the same time (from L2 after the first).
    """
    program = tl.program_id(0)
    block = program % QUERY_BLOCKS
    row_head = program // QUERY_BLOCKS
    row = row_head // KV_HEADS
    head = row_head % KV_HEADS
    width = tl.load(widths + row)
    if block * BLOCK_M >= width * GROUP:
        return
    start_token = tl.load(starts + row)
    length = tl.load(lengths + row)
    numbers = block * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = numbers // GROUP
    heads = head * GROUP + numbers % GROUP
    real = tokens < width
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        query + (start_token + tokens)[:, None] * stride_qt + heads[:, None] * stride_qh
        + dims[None, :],
        mask=real[:, None],
        other=0.0,
    )  # fmt: skip
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total_weight = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    key_base = keys + row * stride_kb + head * stride_kh
    value_base = values + row * stride_vb + head * stride_vh
    # Columns before the chunk are seen by every token: whole blocks, no masks.
    whole = length // BLOCK_N * BLOCK_N
    best, total_weight, acc = attend_range(
        q, key_base, value_base, 0, whole, 0, best, total_weight, acc,
        stride_kl, stride_vl, scale_log2, HEAD_DIM, BLOCK_N, PRECISION, False,
    )  # fmt: skip
    # The rest, up to this block's last token: bounds and each token's causal limit.
    # Every token sees column `whole` (<= length), so no running maximum stays -inf.
    limit = length + tokens
    stop = length + tl.minimum(width, (block * BLOCK_M + BLOCK_M - 1) // GROUP + 1)
    for first in range(whole, stop, BLOCK_N):
        columns = first + tl.arange(0, BLOCK_N)
        valid = columns < stop
        k = tl.load(
            key_base + columns[:, None] * stride_kl + dims[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        seen = valid[None, :] & (columns[None, :] <= limit[:, None])
        scores = tl.where(seen, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp2(best - new_best)
        weights = tl.exp2(scores - new_best[:, None])
        total_weight = total_weight * rescale + tl.sum(weights, 1)
        v = tl.load(
            value_base + columns[:, None] * stride_vl + dims[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        best = new_best
    result = acc / total_weight[:, None]
    pointers = out + (start_token + tokens)[:, None] * stride_ot + heads[:, None] * stride_oh
    tl.store(pointers + dims[None, :], result.to(out.dtype.element_ty), mask=real[:, None])


@triton.jit
def merge_splits(
    acc,
    best,
    weight,
    out,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """One (row, key/value head) program: the softmax of its splits' partial sums, one launch.

    `partial_attention` with several splits left, per split, an unnormalised sum `acc`, its
    base-2 maximum `best` and total weight `weight`. A split that saw no column has
    `best` = -inf and adds nothing (exp2(-inf) = 0); split 0 always sees a column.
    """
    row_head = tl.program_id(0)
    groups = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    first = row_head * SPLITS
    overall = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    for split in range(SPLITS):
        overall = tl.maximum(overall, tl.load(best + (first + split) * GROUP_PAD + groups))
    total = tl.zeros([GROUP_PAD], tl.float32)
    merged = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for split in range(SPLITS):
        slot = first + split
        factor = tl.exp2(tl.load(best + slot * GROUP_PAD + groups) - overall)
        total += tl.load(weight + slot * GROUP_PAD + groups) * factor
        part = tl.load(acc + (slot * GROUP_PAD + groups[:, None]) * HEAD_DIM + dims[None, :])
        merged += part * factor[:, None]
    result = merged / total[:, None]
    offsets = (row_head * GROUP + groups[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(out + offsets, result.to(out.dtype.element_ty), mask=groups[:, None] < GROUP)
