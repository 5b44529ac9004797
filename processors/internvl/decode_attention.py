"""Attention of one greedy decode step over the static KV cache, split along the keys.

The static decode path keeps, per row, the prompt in columns [0, prompt_length) and the
generated tokens in columns [prompt_end, column]; the columns between (right padding of
shorter prompts) and after `column` (not generated yet) are never attended to. A dense
`scaled_dot_product_attention` call with a mask reads every column of the cache; this
kernel reads only the visible ones, one program per (row, key/value head), or several
that split the columns and merge their partial softmax sums ("flash decoding"). The
query heads of one group share each key/value load. With few rows there are too few
(row, key/value head) programs to keep the GPU's memory busy (16 rows, 2 heads: 32
programs on 132 multiprocessors read about 0.7 TB/s on an H200), so by default the
number of splits follows the batch (`auto_splits`).

`SplitKeyAttention` is what the decoder calls. It needs Triton and CUDA tensors
(or `TRITON_INTERPRET=1`, which runs the same kernel on the CPU for tests); callers keep
their dense path for other devices. Shapes are not checked beyond what the kernel needs.
"""

from __future__ import annotations

import functools
from typing import Any

GROUP_PAD = 16  # the smallest row count of a Triton matrix product
LOG2_E = 1.4426950408889634


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, imported on first use: Triton is only needed on a GPU."""
    from processors.internvl.decode_attention_kernels import partial_attention

    return partial_attention


@functools.cache
def _merge_kernel() -> Any:
    """The kernel that merges the splits' partial sums, imported on first use."""
    from processors.internvl.decode_attention_kernels import merge_splits

    return merge_splits


MAX_SPLITS = 16
PROGRAMS_PER_MULTIPROCESSOR = 2


def auto_splits(programs: int, multiprocessors: int) -> int:
    """Splits per (row, key/value head) so the launch has about 2 programs a multiprocessor.

    One split when the rows alone give that many programs (no merge pass); at most
    `MAX_SPLITS`. On an H200 (132 multiprocessors, 2 key/value heads a row) this picked
    the fastest measured count at 16, 64, 128 and 256 rows and one within 1% at 32
    (`bench/profile_kernels.py`, `bench/README.md`).
    """
    wanted = PROGRAMS_PER_MULTIPROCESSOR * multiprocessors
    return max(1, min(MAX_SPLITS, wanted // max(programs, 1)))


@functools.cache
def _multiprocessors(device: Any) -> int:
    """The device's multiprocessor count (Triton's CPU interpreter: a small GPU's 8)."""
    import torch

    if device.type != "cuda":
        return 8
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


@functools.cache
def _chunk_kernel() -> Any:
    """The packed-chunk kernel (`chunk_attention`), imported on first use."""
    from processors.internvl.decode_attention_kernels import chunk_attention_kernel

    return chunk_attention_kernel


def chunk_attention(
    query: Any,
    keys: Any,
    values: Any,
    starts: Any,
    widths: Any,
    lengths: Any,
    scale: float,
    *,
    max_width: int,
    block_m: int = GROUP_PAD,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> Any:
    """Causal attention of rows' packed token chunks over a slot cache (Triton, no sync).

    Args:
        query: (tokens, heads, head dim): every row's chunk, packed; row r's tokens are
            `starts[r]`..`starts[r] + widths[r] - 1`. Tokens of no row come out zero.
        keys: the cache, (at least rows, kv heads, context, head dim), last dim
            contiguous; row r's chunk keys already written at columns `lengths[r]` on.
        values: the cache's values, shaped as `keys`.
        starts: (rows,) integer tensor on the device, each chunk's first packed token.
        widths: (rows,) integer tensor, each chunk's token count (0: no chunk).
        lengths: (rows,) integer tensor, the columns each row held before its chunk.
        scale: the softmax scale.
        max_width: the widest chunk a call may carry (sizes the grid).
        block_m: queries per program (a power of two >= 16); wide chunks (a prompt's)
            want 64 or more, so each block of keys and values serves more queries.
        block_n: columns read per iteration (a power of two >= 16).
        num_warps: Triton warps per program.
        num_stages: Triton software-pipelining stages.

    Token t of a row sees that row's columns [0, lengths[r] + t]. Each (row, key/value
    head) runs one program per block of `block_m` queries (numbered token x group + head
    in the group: with the default 16 a one-token chunk is one block); splitting the
    columns as `SplitKeyAttention` does measured slower here. Returns
    (tokens, heads, head dim) in the query's dtype; heads map to key/value heads as in
    `repeat_kv`.
    """
    import torch

    tokens, heads, head_dim = query.shape
    rows, kv_heads = int(widths.shape[0]), int(keys.shape[1])  # keys may have spare rows
    group = heads // kv_heads
    query_blocks = -(-max_width * group // block_m)
    out = torch.zeros((tokens, heads, head_dim), device=query.device, dtype=query.dtype)
    _chunk_kernel()[(rows * kv_heads * query_blocks,)](
        query, keys, values, starts, widths, lengths, out,
        query.stride(0), query.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        out.stride(0), out.stride(1),
        scale * LOG2_E,
        KV_HEADS=kv_heads, GROUP=group, QUERY_BLOCKS=query_blocks, BLOCK_M=block_m,
        HEAD_DIM=head_dim, BLOCK_N=block_n,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def dense_chunk_attention(
    query: Any,
    keys: Any,
    values: Any,
    starts: Any,
    widths: Any,
    lengths: Any,
    scale: float,
    *,
    max_width: int,
) -> Any:
    """`chunk_attention` by masked SDPA over each row's chunk padded to `max_width`.

    The reference and the fallback where Triton does not run (CPU tests, head sizes the
    kernel does not take); `keys` and `values` hold exactly the rows of `widths`. It reads
    every column of the cache, so its memory grows with rows x `max_width` x context.
    """
    import torch

    tokens, heads, head_dim = (int(size) for size in query.shape)
    rows, kv_heads, context = int(keys.shape[0]), int(keys.shape[1]), int(keys.shape[2])
    group = heads // kv_heads
    picked = torch.arange(max_width, device=query.device)[None, :]
    index = (starts[:, None] + picked).clamp(max=tokens - 1)  # (rows, width)
    grouped = query[index].view(rows, max_width, kv_heads, group, head_dim)
    grouped = grouped.permute(0, 2, 1, 3, 4).reshape(rows, kv_heads, max_width * group, head_dim)
    positions = lengths[:, None] + picked  # (rows, width)
    columns = torch.arange(context, device=query.device)
    seen = (columns[None, None, :] <= positions[:, :, None]).repeat_interleave(group, 1)
    mask = torch.zeros(seen[:, None].shape, dtype=query.dtype, device=query.device)
    mask.masked_fill_(~seen[:, None], float("-inf"))
    attended = torch.nn.functional.scaled_dot_product_attention(
        grouped, keys, values, attn_mask=mask, scale=scale
    )
    attended = attended.view(rows, kv_heads, max_width, group, head_dim)
    attended = attended.permute(0, 2, 1, 3, 4).reshape(rows * max_width, heads, head_dim)
    target = torch.where(picked < widths[:, None], starts[:, None] + picked, tokens)
    out = torch.zeros((tokens + 1, heads, head_dim), dtype=query.dtype, device=query.device)
    out[target.reshape(-1)] = attended  # the blocks' unused rows go to the spare token row
    return out[:tokens]


def split_key_attention(
    query: Any,
    keys: Any,
    values: Any,
    prompt_lengths: Any,
    prompt_end: Any,
    column: Any,
    scale: float,
    splits: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> Any:
    """The kernel launch and the merge of its splits (see `SplitKeyAttention`; 0: auto)."""
    import torch

    batch, kv_heads, group, head_dim = query.shape
    programs = batch * kv_heads
    if splits == 0:
        splits = auto_splits(programs, _multiprocessors(query.device))
    out = torch.empty((batch, kv_heads, group, head_dim), device=query.device, dtype=query.dtype)
    partial_rows = programs * splits if splits > 1 else 1
    options = {"device": query.device, "dtype": torch.float32}
    acc = torch.empty((partial_rows, GROUP_PAD, head_dim), **options)
    best = torch.empty((partial_rows, GROUP_PAD), **options)
    weight = torch.empty((partial_rows, GROUP_PAD), **options)
    _kernel()[(programs, splits)](
        query,
        keys,
        values,
        prompt_lengths,
        prompt_end,
        column,
        out,
        acc,
        best,
        weight,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        scale * LOG2_E,
        KV_HEADS=kv_heads,
        GROUP=group,
        GROUP_PAD=GROUP_PAD,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        SPLITS=splits,
        # float32 caches get full-precision products (Triton's default there is TF32).
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits == 1:
        return out
    _merge_kernel()[(programs,)](
        acc, best, weight, out,
        GROUP=group, GROUP_PAD=GROUP_PAD, HEAD_DIM=head_dim, SPLITS=splits, num_warps=4,
    )  # fmt: skip
    return out


@functools.cache
def _custom_op() -> Any:
    """`split_key_attention` as an opaque torch operator, so `torch.compile` keeps it whole."""
    import torch

    # An explicit schema: this module's annotations are strings (postponed evaluation).
    schema = (
        "(Tensor query, Tensor keys, Tensor values, Tensor prompt_lengths, Tensor prompt_end, "
        "Tensor column, float scale, int splits, int block_n, int num_warps, int num_stages) "
        "-> Tensor"
    )

    operator = torch.library.custom_op(
        "visionstream::split_key_attention", split_key_attention, mutates_args=(), schema=schema
    )

    @operator.register_fake
    def _(query: Any, *args: Any) -> Any:
        return torch.empty_like(query)

    return operator


class SplitKeyAttention:
    """`__call__`: attention output (batch, kv heads, group, head dim) of one decode step.

    Args of a call:
        query: (batch, kv heads, group, head dim); the query heads of each key/value head.
        keys, values: the cache, (batch, kv heads, length, head dim), last dim contiguous.
        prompt_lengths: (batch,) integer tensor, each row's real prompt length.
        prompt_end: () integer tensor, the first column of generated tokens.
        column: () integer tensor, the last column to attend to (this step's token).
        scale: the softmax scale.

    Every row must see at least one column. The integer tensors stay on the device, so a
    call needs no host synchronisation and can be captured in a CUDA graph; it is one
    opaque operator to `torch.compile`. `splits` programs share each (row, key/value
    head) (1: no merge pass; 0, the default: `auto_splits` of the call's batch, so each
    captured graph of a batch ladder gets its own); `block_n` columns are read per
    iteration. `block_n` and the warps were the fastest measured on an H100 at batch 256
    and 512 (`bench/profile_parts.py`); the splits on an H200 (`bench/profile_kernels.py`).
    """

    def __init__(
        self, *, splits: int = 0, block_n: int = 64, num_warps: int = 4, num_stages: int = 3
    ) -> None:
        if splits < 0 or block_n < 16 or block_n & (block_n - 1):
            raise ValueError("splits must be >= 0 (0: auto) and block_n a power of two >= 16")
        self.operator = _custom_op()
        self.splits = splits
        self.block_n = block_n
        self.num_warps = num_warps
        self.num_stages = num_stages

    @staticmethod
    def supports(head_dim: int, group: int) -> bool:
        """Whether the kernel handles this head size and query heads per key/value head."""
        return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and group <= GROUP_PAD

    def __call__(
        self,
        query: Any,
        keys: Any,
        values: Any,
        prompt_lengths: Any,
        prompt_end: Any,
        column: Any,
        scale: float,
    ) -> Any:
        """The attention output of one decode step (see the class docstring for the args).

        Raises:
            ValueError: when the query's head size or group is not supported.
        """
        if not self.supports(query.shape[3], query.shape[2]):
            raise ValueError(f"unsupported query shape {tuple(query.shape)}")
        return self.operator(
            query, keys, values, prompt_lengths, prompt_end, column, float(scale),
            self.splits, self.block_n, self.num_warps, self.num_stages,
        )  # fmt: skip
