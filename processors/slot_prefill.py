"""The slot engine's prefill: prompts into staging rows, on captured CUDA graphs.

`StagedPrefill` owns the staging rows (keys and values of every layer, one block) that
newcomers are prefilled into before `SlotDecoder.activate_rows` copies them into free
slots. Whole prompts go through `prefill_rows`: their ids are right-padded to a width of
the ladder (multiples of `WIDTH_BUCKET` tokens) and their count to a row size (1, 2, 4,
...), so one CUDA graph per (rows, width) serves every group; the graphs are captured at
start, for shapes of up to `graph_tokens` padded tokens (a larger group runs eagerly).
Off CUDA, or with graphs off, the same code runs eagerly. Padding is harmless: the
attention is causal (a real token never sees a later pad) and padded rows are never
activated.

Why graphs: a group of one or two prompts costs the GPU about 10 to 20 ms, and
launching its 24 layers from Python (compiled layers included) cost about as much host
time, measured on an H200, so the GPU waited on the host (`bench/profile_slot.py`).

A prompt longer than the per-step budget goes in chunks (`prefill_chunk`, eager) into
staging row 0. Not thread-safe: the scheduler's thread drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from processors.internvl import StaticGreedyDecoder, capture_graph

WIDTH_BUCKET = 128
"""Prompt widths are padded to a multiple of this many tokens (at most 127, 4.2 % of 3,000).

It was 256: the benchmark's prompts average 3,065 tokens, a group takes its longest
member's width, and a prompt just over 3,072 then padded to 3,328. Twice as many shapes
are captured at start, into one memory pool (`bench/results/load-h200.json`: start-up
51.7 s, peak GPU memory 60.3 GiB with 1,024 slots).
"""


def kv_block(base: StaticGreedyDecoder, rows: int, context: int) -> Any:
    """Zeroed keys and values of every layer in one tensor.

    Shape (2, layers, rows, kv heads, context, head dim): `block[0, i]` and `block[1, i]`
    are layer i's keys and values, contiguous, so one copy moves a row's columns of every
    layer at once.
    """
    import torch

    shape = (2, len(base.layers), rows, base.kv_heads, context, base.head_dim)
    return torch.zeros(shape, device=base.device, dtype=base.dtype)


def prompt_embeddings(base: StaticGreedyDecoder, input_ids: Any, image_features: Any) -> Any:
    """The input embeddings of `input_ids`, image tokens replaced by `image_features` in order.

    `image_features` holds every image token's projected features, (tokens, hidden), or
    None for no image token.
    """
    embeds = base.language_model.embed_tokens(input_ids)
    if image_features is None:
        return embeds
    mask = (input_ids == base.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, image_features.to(embeds.dtype))


def row_sizes(rows: int) -> list[int]:
    """Group sizes with a captured prefill: powers of two below `rows`, then `rows`."""
    sizes = {rows}
    size = 1
    while size < rows:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def width_ladder(context: int, bucket: int = WIDTH_BUCKET) -> list[int]:
    """Padded prompt widths: multiples of `bucket` below `context`, then `context`."""
    return sorted({*range(bucket, context, bucket), context})


class StagedPrefill:
    """Prefill into `rows` staging rows of `context` columns (see the module docstring)."""

    def __init__(
        self,
        base: StaticGreedyDecoder,
        *,
        rows: int,
        context: int,
        cuda_graphs: bool,
        graph_tokens: int = 16384,
    ) -> None:
        import torch

        self.base = base
        self.rows = rows
        self.context = context
        self.device = base.device
        self.eos_id = base.eos_id
        self.on_cuda = str(self.device).startswith("cuda")
        self.cuda_graphs = cuda_graphs and self.on_cuda
        self.kv = kv_block(base, rows, context)
        self.keys = [self.kv[0, index] for index in range(len(base.layers))]
        self.values = [self.kv[1, index] for index in range(len(base.layers))]
        self.row_sizes = row_sizes(rows)
        self.widths = width_ladder(context)
        # Captured shapes hold at most `graph_tokens` padded tokens (bounded memory and
        # start-up); a rarer, larger group runs eagerly.
        self.graph_shapes = [
            (size, width)
            for size in self.row_sizes
            for width in self.widths
            if size * width <= max(graph_tokens, width)
        ]
        hidden = int(base.language_model.embed_tokens.embedding_dim)
        vocab = int(base.lm_head.out_features)
        options = {"device": self.device}
        self.ids = torch.full((rows, context), self.eos_id, dtype=torch.long, **options)
        self.embeds = torch.zeros((rows, context, hidden), dtype=base.dtype, **options)
        self.last = torch.zeros(rows, dtype=torch.long, **options)  # each row's last token
        self.logits = torch.zeros((rows, vocab), dtype=torch.float32, **options)
        self._graphs: dict[tuple[int, int], Any] = {}
        self._pool: Any = None
        self.capture_error: str | None = None  # why prefill runs eagerly on CUDA, if it does

    def unpadded_rows(self, count: int) -> int:
        """The largest row size of the ladder that is at most `count` (no padded rows)."""
        return max(size for size in self.row_sizes if size <= max(1, count))

    def shape_for(self, rows: int, width: int) -> tuple[int, int]:
        """The captured (rows, width) that holds `rows` prompts of at most `width` tokens."""
        padded_rows = next(size for size in self.row_sizes if size >= rows)
        return padded_rows, next(size for size in self.widths if size >= width)

    def prefill_rows(
        self,
        prompts: Sequence[Sequence[int]],
        image_features: Any,
        min_new: Sequence[int],
        logits_mask: Any = None,
    ) -> Any:
        """Prefill whole prompts into staging rows 0..len-1 in one pass.

        `image_features` holds every image token's features in row order, or None.
        Returns each row's greedy first token, shape (rows,), with `<|im_end|>`
        suppressed in rows whose `min_new` is > 0 and `logits_mask(logits)` applied
        first when given. Raises `ValueError` for more prompts than staging rows or a
        prompt longer than the context.
        """
        count, width = len(prompts), max(len(ids) for ids in prompts)
        if not 0 < count <= self.rows or width > self.context:
            raise ValueError(f"{count} prompts of <= {width} tokens for {self.rows} rows")
        rows, padded = self.shape_for(count, width)
        ids = self.ids[:rows, :padded]
        ids.copy_(self._padded_ids(prompts, rows, padded), non_blocking=self.on_cuda)
        self.embeds[:rows, :padded].copy_(prompt_embeddings(self.base, ids, image_features))
        self._run(rows, padded)
        logits = self.logits[:count]
        if logits_mask is not None:
            logits_mask(logits)
        for row, needed in enumerate(min_new):
            if needed > 0:
                logits[row, self.eos_id] = -float("inf")
        return logits.argmax(-1)

    def _padded_ids(self, prompts: Sequence[Sequence[int]], rows: int, width: int) -> Any:
        """(rows, width) ids in host memory (pinned on CUDA), padded with `<|im_end|>`.

        Also queues the copy of each row's last real column to `self.last`.
        """
        import torch

        pinned = self.on_cuda
        host = torch.full((rows, width), self.eos_id, dtype=torch.long, pin_memory=pinned)
        last = torch.zeros(rows, dtype=torch.long, pin_memory=pinned)
        for row, ids in enumerate(prompts):
            host[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            last[row] = len(ids) - 1
        self.last[:rows].copy_(last, non_blocking=pinned)
        return host

    def _run(self, rows: int, width: int) -> None:
        graph = self._graphs.get((rows, width))
        if graph is None and self.cuda_graphs and (rows, width) in self.graph_shapes:
            graph = self._capture(rows, width)
        if graph is None:
            self._forward(rows, width)
        else:
            graph.replay()

    def capture(self) -> None:
        """Capture the graph of every shape of `graph_shapes` (CUDA with graphs on).

        The warm-up runs write only staging rows, which hold nothing between groups. A
        layer that cannot be captured leaves prefill eager (slower, same results); the
        reason is kept in `capture_error`.
        """
        if not self.cuda_graphs:
            return
        try:
            for shape in self.graph_shapes:
                if shape not in self._graphs:
                    self._capture(*shape)
        except RuntimeError as exc:  # torch's capture errors are RuntimeErrors
            self.capture_error = f"{type(exc).__name__}: {exc}"[:500]
            self._graphs.clear()
            self.cuda_graphs = False

    def _capture(self, rows: int, width: int) -> Any:
        import torch

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = capture_graph(self.device, lambda: self._forward(rows, width), pool=self._pool)
        self._graphs[(rows, width)] = graph
        return graph

    def _forward(self, rows: int, width: int) -> None:
        """The layers over `embeds[:rows, :width]`: staging keys and values, first logits.

        Static buffers only (graph-capturable): the same layer code as the static path's
        prefill (`StaticGreedyDecoder.prefill_layer`).
        """
        import torch

        base = self.base
        language_model = base.language_model
        hidden = self.embeds[:rows, :width]
        positions = torch.arange(width, device=hidden.device)[None, :]
        cos, sin = language_model.rotary_emb(hidden, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]
        for index, layer in enumerate(base.layers):
            hidden, key, value = base.prefill_layer(layer, hidden, cos, sin)
            self.keys[index][:rows, :, :width] = key
            self.values[index][:rows, :, :width] = value
        last = hidden[torch.arange(rows, device=hidden.device), self.last[:rows]]
        logits = base.lm_head(language_model.norm(last)[:, None, :])[:, -1, :].float()
        self.logits[:rows].copy_(logits)

    def prefill_chunk(
        self,
        input_ids: Any,
        start: int,
        image_features: Any,
        last: bool,
        min_new_tokens: int,
        logits_mask: Any = None,
    ) -> Any:
        """Prefill prompt columns [start, start + len) of staging row 0 (eagerly).

        `input_ids` is (1, chunk) on the device; `image_features` the projected features
        of this chunk's image tokens in order, (tokens, hidden), or None. Columns before
        `start` must hold the earlier chunks. Returns the greedy first token, shape (1,),
        when `last` (`<|im_end|>` suppressed if `min_new_tokens` > 0, `logits_mask(logits)`
        applied first when given), else None.
        """
        import torch
        import torch.nn.functional as functional

        base = self.base
        language_model = base.language_model
        embeds = prompt_embeddings(base, input_ids, image_features)
        width = int(input_ids.shape[1])
        end = start + width
        positions = torch.arange(start, end, device=input_ids.device)[None, :]
        cos, sin = language_model.rotary_emb(embeds, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]
        causal = None
        if start:
            columns = torch.arange(end, device=input_ids.device)[None, :]
            causal = columns <= positions[0][:, None]  # (chunk, end): earlier columns + causal
        hidden = embeds
        for index, layer in enumerate(base.layers):
            if not start:  # the first chunk is exactly the static path's prefill layer
                hidden, key, value = base.prefill_layer(layer, hidden, cos, sin)
                self.keys[index][0, :, :end] = key[0]  # already (kv heads, width, dim)
                self.values[index][0, :, :end] = value[0]
                continue
            query, key, value = base.rotated_projections(layer, hidden, cos, sin)
            self.keys[index][0, :, start:end] = key[0].transpose(0, 1)
            self.values[index][0, :, start:end] = value[0].transpose(0, 1)
            # Heads expanded by hand (repeat_kv order): with a mask and `enable_gqa`, SDPA
            # would fall back to its slow math kernel on CUDA.
            group = base.heads // base.kv_heads
            attended = functional.scaled_dot_product_attention(
                query.transpose(1, 2),
                self.keys[index][:1, :, :end].repeat_interleave(group, dim=1),
                self.values[index][:1, :, :end].repeat_interleave(group, dim=1),
                attn_mask=causal,
                scale=layer.self_attn.scaling,
            )
            attended = attended.transpose(1, 2).reshape(1, width, base.heads * base.head_dim)
            hidden = base.layer_output(layer, hidden, attended)
        if not last:
            return None
        final = language_model.norm(hidden[:, -1])
        logits = base.lm_head(final[:, None, :])[:, -1, :].float()
        if logits_mask is not None:
            logits_mask(logits)
        if min_new_tokens > 0:
            logits[:, self.eos_id] = -float("inf")
        return logits.argmax(-1)
