"""The device side of the slot engine: a pool of KV-cache slots decoded together.

`SlotDecoder` owns one static KV cache of `slots` rows x `context` columns per layer and
per-row state in device tensors: the token each row feeds next, its length (columns
written), how many tokens it has produced, its `min_new_tokens` and whether it is active.
The active rows are always rows [0, n) (the host moves the last active row into a row
that leaves, all of a round's moves in one copy, see `move_rows`), so a decode step runs
over the first `b` rows, `b` the smallest size of the ladder >= n; rows in [n, b) are
inactive (length 0, their outputs ignored).

A row's prompt sits in columns [0, prompt length) and its generated tokens right after
it, so a row's next position is its length: the split-key kernel
(`processors.decode_attention`) reads each row's first `length + 1` columns (its prompt
length argument is the per-row visible count; the generated range it has beside is left
empty), and the dense path masks the rest. Nothing per row lives on the host, so one
CUDA graph per ladder size serves every mix of rows, and admissions never re-capture.

Newcomers are prefilled into staging rows (`processors.slot_prefill`: whole prompts on
captured graphs, or a long prompt in chunks), then copied into free rows
(`activate_rows`, one copy for a group). The layer
bodies (norms, projections, rotary embedding, MLP) are those of
`processors.internvl.StaticGreedyDecoder`, by reference, so the slot path computes what
the static path computes; `min_new_tokens` suppresses `<|im_end|>` per row, as
`MinNewTokensLengthLogitsProcessor` does.

Constrained decoding steps with `wide_step`: each row feeds its chosen token and the
tokens its grammar forces after it (its chunk) in one pass. The chunks are packed one
after another (`load_chunks`), so projections and MLP run over the real tokens only, and
attention runs per row (`processors.internvl.chunk_attention`: each token reads its
row's visible columns, causally within the chunk); one CUDA graph per packed size of a
ladder serves every mix of widths. The host masks the logits between pass and argmax.

Not thread-safe: one thread (the scheduler's) drives it. Shapes are checked by the
caller (`processors.slot_engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from processors.internvl import (
    SplitKeyAttention,
    StaticGreedyDecoder,
    capture_graph,
    chunk_attention,
    dense_chunk_attention,
)
from processors.slot_prefill import StagedPrefill, kv_block


def token_ladder(max_tokens: int) -> list[int]:
    """Packed sizes of the wide pass: 1, 2, 3, 4, 6, 8, 12, ... up to `max_tokens` (included).

    Powers of two and the midpoints between them, so padding stays under a third.
    """
    sizes = {max_tokens}
    size = 1
    while size < max_tokens:
        sizes.update(s for s in (size, size + size // 2) if s < max_tokens)
        size *= 2
    return sorted(sizes)


def graph_ladder(slots: int) -> list[int]:
    """Batch sizes with a captured step: 1, 2, 4, ..., 32, then every 32 up to `slots`."""
    sizes = {size for size in (1, 2, 4, 8, 16, 32) if size < slots}
    sizes.update(range(64, slots, 32))
    sizes.add(slots)
    return sorted(sizes)


class SlotDecoder:
    """Static KV slots, prefill into staging rows (`prefill`), decode steps over rows [0, b)."""

    def __init__(
        self,
        base: StaticGreedyDecoder,
        *,
        slots: int,
        context: int,
        steps_per_round: int,
        cuda_graphs: bool = True,
        compile_step: bool = False,
        ladder: Sequence[int] | None = None,
        stage_rows: int = 8,
        prefill_graph_tokens: int = 16384,
        max_width: int = 1,
        vocab_size: int = 0,
        position_argmax: bool = False,
    ) -> None:
        import torch

        if slots < 1 or context < 2 or steps_per_round < 1 or stage_rows < 1 or max_width < 1:
            raise ValueError(
                "slots, steps_per_round, stage_rows, max_width must be >= 1, context >= 2"
            )
        self.base = base
        self.slots = slots
        self.context = context
        self.steps_per_round = steps_per_round
        self.device = base.device
        self.dtype = base.dtype
        self.eos_id = base.eos_id
        self.ladder = sorted(set(ladder)) if ladder else graph_ladder(slots)
        if self.ladder[-1] < slots or self.ladder[0] < 1:
            raise ValueError(f"the ladder {self.ladder} must cover 1..{slots}")
        self.stage_rows = stage_rows
        # One spare row past the slots: padding tokens of the wide pass write there. One
        # block for every layer's keys and values, so moving rows is one copy.
        self.kv = kv_block(base, slots + 1, context)
        self.keys = [self.kv[0, index] for index in range(len(base.layers))]
        self.values = [self.kv[1, index] for index in range(len(base.layers))]

        def longs(*size: int) -> Any:
            return torch.zeros(size, dtype=torch.long, device=self.device)

        self.tokens = longs(slots)  # the token each row feeds to the next step
        self.lengths = longs(slots + 1)  # columns written; the spare row's stays 0
        self.produced = longs(slots)  # tokens generated so far (the first from prefill)
        self.min_new = longs(slots)
        self.active = longs(slots)
        self.rows = torch.arange(slots, device=self.device)
        self.round_out = longs(slots, steps_per_round)  # ids of this round's steps
        self.round_step = longs()
        self._one = torch.ones((), dtype=torch.long, device=self.device)
        self._zero = longs()
        self._split: SplitKeyAttention | None = base.split_key_attention
        self._run_layer: Any = self._decode_layer
        if compile_step:
            self._run_layer = torch.compile(self._decode_layer, dynamic=True)
        self.on_cuda = str(self.device).startswith("cuda")
        self.cuda_graphs = cuda_graphs and self.on_cuda
        # The round's ids and newcomers' first tokens, copied out without a stream sync.
        self.round_host = torch.zeros(
            slots * (steps_per_round + 1), dtype=torch.long, pin_memory=self.on_cuda
        )
        self._round_copied: Any = None
        self.prefill = StagedPrefill(
            base,
            rows=stage_rows,
            context=context,
            cuda_graphs=self.cuda_graphs,
            graph_tokens=prefill_graph_tokens,
        )
        self._graphs: dict[int, Any] = {}
        self.compile_error: str | None = None
        self.max_width = max_width
        self._wide_buffers(vocab_size, position_argmax)
        self._wide_graphs: dict[tuple[Any, ...], Any] = {}
        # Profiling: set to a list to get ("wide", start, end) CUDA events of each pass
        # of `wide_step`.
        self.pass_events: list[tuple[str, Any, Any]] | None = None
        self._graph_pool: Any = None

    def _wide_buffers(self, vocab_size: int, position_argmax: bool) -> None:
        """The buffers of the wide step (constrained decoding).

        Each row feeds its chosen token and the tokens the grammar forces after it, up to
        `max_width`, packed into one pass. `packed` rows: packed tokens, their rows, their
        offsets in the chunk; then per row (the first `slots` columns) the chunk's first
        packed index and its width. The chosen ids go to pinned host memory as soon as
        they exist, so the host can take them while later work (prefill) still runs. With
        `position_argmax` the pass also writes the greedy choice after every packed token
        (the model's own next token at each forced position), copied out with them.
        """
        import torch

        self.token_sizes = token_ladder(self.slots * self.max_width)
        columns = self.token_sizes[-1]

        def pinned(*size: int) -> Any:
            return torch.zeros(size, dtype=torch.long, pin_memory=self.on_cuda)

        self.packed = torch.zeros((5, columns), dtype=torch.long, device=self.device)
        self.packed_host = pinned(5, columns)
        self.tokens_host = pinned(self.slots)
        self._tokens_copied: Any = None
        self.position_ids: Any = None
        self.position_ids_host: Any = None
        if position_argmax:
            self.position_ids = torch.zeros(columns, dtype=torch.long, device=self.device)
            self.position_ids_host = pinned(columns)
        self.logits: Any = None
        if vocab_size:
            shape = (self.slots, vocab_size)
            self.logits = torch.zeros(shape, dtype=torch.float32, device=self.device)

    @property
    def split_attention(self) -> bool:
        """Whether steps use the Triton kernels (split-key, `chunk_attention`); else masked SDPA."""
        return self._split is not None

    # ------------------------------------------------------------------- sizing

    @staticmethod
    def bytes_per_slot(base: StaticGreedyDecoder, context: int) -> int:
        """Device bytes of one slot's keys and values over every layer."""
        element = int(next(base.model.parameters()).element_size())
        return 2 * len(base.layers) * base.kv_heads * base.head_dim * context * element

    def batch_for(self, active: int) -> int:
        """The smallest ladder size holding `active` rows."""
        return next(size for size in self.ladder if size >= active)

    # ------------------------------------------------------------------ prefill

    def to_device(self, prompts: Sequence[Sequence[int]], pad: int) -> Any:
        """Right-padded ids on the device, through pinned memory (no stream sync)."""
        import torch

        width = max(len(ids) for ids in prompts)
        host = torch.full((len(prompts), width), pad, dtype=torch.long, pin_memory=self.on_cuda)
        for row, ids in enumerate(prompts):
            host[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return host.to(self.device, non_blocking=True)

    def activate_rows(
        self, first_row: int, lengths: Sequence[int], first_tokens: Any, min_new: Sequence[int]
    ) -> None:
        """Copy staging rows 0..n-1 into rows `first_row`.. and make them decode from there.

        One copy of every layer's columns up to the longest prompt (columns past a row's
        length are never read before a step writes them); `first_tokens` is (n,).
        """
        count, columns = len(lengths), max(lengths)
        rows = slice(first_row, first_row + count)
        self.kv[:, :, rows, :, :columns] = self.prefill.kv[:, :, :count, :, :columns]
        self.tokens[rows] = first_tokens
        for row, (length, needed) in enumerate(zip(lengths, min_new, strict=True), first_row):
            self.lengths[row] = length
            self.min_new[row] = needed
        self.produced[rows] = 1
        self.active[rows] = 1

    def move_rows(self, moves: Sequence[tuple[int, int]], columns: int, keep: int) -> None:
        """Move rows: each (source, target) row's first `columns` columns and its state.

        Then every row from `keep` on is free. Sources must be rows >= `keep` and targets
        rows below it (what the scheduler's leaving rows produce), so one gather and one
        scatter do every move.
        """
        if moves:
            sources = self._indices([source for source, _ in moves])
            targets = self._indices([target for _, target in moves])
            self.kv[:, :, targets, :, :columns] = self.kv[:, :, sources, :, :columns]
            for state in (self.tokens, self.lengths, self.produced, self.min_new, self.active):
                state[targets] = state[sources]
        for state in (self.lengths, self.produced, self.min_new, self.active):
            state[keep : self.slots] = 0

    def _indices(self, values: list[int]) -> Any:
        """Row indices on the device through pinned memory (no stream sync)."""
        import torch

        host = torch.tensor(values, dtype=torch.long, pin_memory=self.on_cuda)
        return host.to(self.device, non_blocking=True)

    def release(self, row: int) -> None:
        """Mark `row` free: inactive, length 0 (a padded step then writes only column 0)."""
        for state in (self.lengths, self.produced, self.min_new, self.active):
            state[row] = 0

    # ------------------------------------------------------------------- decode

    def copy_round(self, count: int, steps: int, firsts: Sequence[Any]) -> int:
        """Queue the copy of rows [0, count)'s `steps` ids, then `firsts`, to the host.

        Returns how many values `round_ids` will give: row-major ids, then one per first
        token (each a (1,) device tensor). Nothing waits here, so the caller can queue more
        GPU work (the next newcomers' vision) before it takes them.
        """
        import torch

        flat = self.round_out[:count, :steps].reshape(-1)
        if firsts:
            flat = torch.cat([flat, *firsts])
        size = int(flat.numel())
        self.round_host[:size].copy_(flat, non_blocking=self.on_cuda)
        if self.on_cuda:
            self._round_copied = torch.cuda.Event()
            self._round_copied.record()
        return size

    def round_ids(self, size: int) -> list[int]:
        """The values of the last `copy_round` (`size` of them); waits for that copy only."""
        if self._round_copied is not None:
            self._round_copied.synchronize()
            self._round_copied = None
        values: list[int] = self.round_host[:size].tolist()
        return values

    def begin_round(self) -> None:
        """Start a round of steps: the next step writes the round's first column."""
        self.round_step.zero_()

    def step(self, active: int) -> None:
        """One greedy token for each of rows [0, active); queued, never waits for the GPU."""
        batch = self.batch_for(active)
        graph = self._graphs.get(batch)
        if graph is not None:
            graph.replay()
        else:
            self._step(batch)

    def capture_graphs(self) -> None:
        """Capture one CUDA graph per ladder size; call while no row is active.

        The warm-up steps run over inactive rows only, so they change no row's length and
        write only column 0 of free rows. A compiled layer that cannot be captured falls
        back to the eager layer (the reason is kept in `compile_error`).
        """
        import torch

        if not self.cuda_graphs or self._graphs:
            return
        if int(self.active.sum()):
            raise RuntimeError("graphs must be captured while no slot is active")
        pool = torch.cuda.graph_pool_handle()
        for batch in self.ladder:
            try:
                self._graphs[batch] = self._capture(batch, pool)
            except Exception as exc:
                if self._run_layer == self._decode_layer:
                    raise
                self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
                self._run_layer = self._decode_layer
                self._graphs.clear()
                pool = torch.cuda.graph_pool_handle()
                return self.capture_graphs()
        self.tokens.zero_()
        self.round_step.zero_()
        return None

    def _capture(self, batch: int, pool: Any) -> Any:
        return capture_graph(
            self.device, lambda: self._step(batch), pool=pool, reset=self.round_step.zero_
        )

    def _step(self, batch: int) -> None:
        """The step over rows [0, batch), on static buffers only (graph-capturable)."""
        base = self.base
        language_model = base.language_model
        lengths = self.lengths[:batch]
        hidden = language_model.embed_tokens(self.tokens[:batch, None])  # (batch, 1, hidden)
        cos, sin = language_model.rotary_emb(hidden, lengths[:, None])
        cos, sin = cos[:, :, None], sin[:, :, None]
        visible = lengths + 1  # the prompt, the generated tokens and this step's token
        mask = None
        if self._split is None:
            import torch

            columns = torch.arange(self.context, device=self.device)[None, :]
            mask = (columns < visible[:, None])[:, None, None, :]
        rows = self.rows[:batch]
        for index, layer in enumerate(base.layers):
            hidden = self._run_layer(
                layer,
                hidden,
                cos,
                sin,
                self.keys[index][:batch],
                self.values[index][:batch],
                rows,
                lengths,
                visible,
                mask,
            )
        hidden = language_model.norm(hidden)
        self.advance(batch, base.lm_head(hidden)[:, -1, :].float())

    def advance(self, batch: int, logits: Any) -> None:
        """A step's end over rows [0, batch): `logits` (batch, vocab, float) to tokens and state.

        The greedy token of every row (`<|im_end|>` suppressed below `min_new`) goes to the
        round's column and feeds the next step; active rows grow by one. Static buffers
        only (captured in `step`'s graphs and in `processors.slot_mixed`'s).
        """
        suppress = self.produced[:batch] < self.min_new[:batch]
        logits[:, self.eos_id] = logits[:, self.eos_id].masked_fill(suppress, -float("inf"))
        chosen = logits.argmax(-1)
        self.round_out[:batch].index_copy_(1, self.round_step.view(1), chosen[:, None])
        self.tokens[:batch] = chosen
        active = self.active[:batch]
        self.lengths[:batch] += active
        self.produced[:batch] += active
        self.round_step.add_(1)

    def _decode_layer(
        self,
        layer: Any,
        hidden: Any,
        cos: Any,
        sin: Any,
        keys: Any,
        values: Any,
        rows: Any,
        lengths: Any,
        visible: Any,
        mask: Any,
    ) -> Any:
        """One decoder layer, one new token per row, written at each row's own column."""
        import torch.nn.functional as functional

        base = self.base
        batch = hidden.shape[0]
        scale = layer.self_attn.scaling
        query, key, value = base.rotated_projections(layer, hidden, cos, sin)
        keys[rows, :, lengths] = key[:, 0]
        values[rows, :, lengths] = value[:, 0]
        grouped = query.reshape(batch, base.kv_heads, base.heads // base.kv_heads, base.head_dim)
        if self._split is not None:
            # Per-row visible counts as the "prompt"; the generated range is left empty.
            attended = self._split(grouped, keys, values, visible, self._one, self._zero, scale)
        else:
            attended = functional.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=mask, scale=scale
            )
        attended = attended.reshape(batch, 1, base.heads * base.head_dim)
        return base.layer_output(layer, hidden, attended)

    # --------------------------------------------------------------- wide step

    def tokens_for(self, count: int) -> int:
        """The packed-token count of the captured wide pass that holds `count` tokens."""
        return next(size for size in self.token_sizes if size >= count)

    def load_chunks(self, chunks: Sequence[Sequence[int]]) -> int:
        """Queue the next wide step's input: `chunks[r]` is what row r feeds (1+ tokens).

        Row r's chunk is its chosen token and the tokens its grammar forces after it, at
        most `max_width` in all; an empty chunk and rows from `len(chunks)` on feed nothing
        (their logits are meaningless). The chunks are packed one after another (then
        padding tokens, written to the spare row) into one pinned host buffer and copied
        with one non-blocking copy; the caller waits on the step's ids before it loads
        again, so the buffer is free by then. Returns the packed count of the pass
        (`tokens_for` of the chunks' total). Raises `ValueError` for more chunks than
        slots or a chunk wider than `max_width`.
        """
        total = sum(len(chunk) for chunk in chunks)
        if len(chunks) > self.slots or any(len(c) > self.max_width for c in chunks):
            raise ValueError(f"{len(chunks)} chunks for {self.slots} rows of <= {self.max_width}")
        # The pass computes logits for rows [0, size): every row with a chunk must be there.
        fed_rows = max((row + 1 for row, chunk in enumerate(chunks) if chunk), default=0)
        size = self.tokens_for(max(total, fed_rows, 1))
        flat: list[int] = []
        owners: list[int] = []
        offsets: list[int] = []
        starts = [0] * self.slots
        widths = [0] * self.slots
        for row, chunk in enumerate(chunks):
            starts[row], widths[row] = len(flat), len(chunk)
            flat.extend(chunk)
            owners.extend([row] * len(chunk))
            offsets.extend(range(len(chunk)))
        pad = size - total
        host = self.packed_host
        host[0, :size] = self._as_longs([*flat, *[0] * pad])
        host[1, :size] = self._as_longs([*owners, *[self.slots] * pad])  # the spare row
        host[2, :size] = self._as_longs([*offsets, *[0] * pad])
        host[3, : self.slots] = self._as_longs(starts)
        host[4, : self.slots] = self._as_longs(widths)
        columns = max(size, self.slots)
        self.packed[:, :columns].copy_(host[:, :columns], non_blocking=self.on_cuda)
        return size

    def _as_longs(self, values: list[int]) -> Any:
        import torch

        return torch.tensor(values, dtype=torch.long)

    def wide_step(self, active: int, size: int, mask: Any = None) -> Any:
        """One step over rows [0, active): each feeds its chunk (`load_chunks`) in one pass.

        Every token attends causally to its row's earlier columns; the next token of a
        row is the greedy choice after its chunk's last token (`<|im_end|>` suppressed
        while `produced` is below `min_new`), with `mask(logits)` applied first when given
        (called once the pass is queued, so a host-side bitmask fill overlaps it). Each
        row's length and `produced` grow by its width. `size` is what `load_chunks`
        returned. Returns the chosen ids, (active,) on the device, not yet on the host.
        """
        self._replay(("wide", size), lambda: self.forward_packed(size))
        logits = self.logits[:active]
        if mask is not None:
            mask(logits)
        chosen = logits.argmax(-1)
        self.tokens[:active] = chosen
        self.tokens_host[:active].copy_(chosen, non_blocking=self.on_cuda)
        if self.position_ids is not None and self.position_ids_host is not None:
            self.position_ids_host[:size].copy_(self.position_ids[:size], non_blocking=self.on_cuda)
        if self.on_cuda:
            import torch

            self._tokens_copied = torch.cuda.Event()
            self._tokens_copied.record()
        widths = self.packed[4, :active]
        self.lengths[:active] += widths
        self.produced[:active] += widths
        return chosen

    def stepped_positions(self, size: int) -> list[int]:
        """The last wide step's greedy choice after each of its `size` packed tokens.

        Call after `stepped_tokens` (which waits for the step); needs `position_argmax`.
        """
        if self.position_ids_host is None:
            raise RuntimeError("the decoder was built without position_argmax")
        values: list[int] = self.position_ids_host[:size].tolist()
        return values

    def rewind(self, row: int, count: int) -> None:
        """Take back the last `count` tokens `row` fed: its length and `produced` shrink.

        Their keys and values stay in columns no step reads until they are written again.
        """
        self.lengths[row] -= count
        self.produced[row] -= count

    def stepped_tokens(self, count: int) -> list[int]:
        """The last wide step's ids of rows [0, count) on the host; waits for that step only."""
        if self._tokens_copied is not None:
            self._tokens_copied.synchronize()
        values: list[int] = self.tokens_host[:count].tolist()
        return values

    def capture_wide(self) -> None:
        """Capture the wide pass of every packed size (CUDA only); call while no row decodes.

        The warm-up runs feed nothing but padding (written to the spare row); otherwise a
        size is captured on first use.
        """
        if not self.cuda_graphs or self.logits is None:
            return
        self.packed.zero_()
        self.packed[1].fill_(self.slots)
        for size in self.token_sizes:
            self._replay(("wide", size), lambda s=size: self.forward_packed(s))
        self.logits.zero_()

    def _replay(self, key: tuple[Any, ...], forward: Any) -> None:
        """Run `forward` through its CUDA graph, captured on first use (eagerly off CUDA).

        A warm-up run writes keys and values only from each row's length on (columns no
        row sees yet) and changes no counter, so capturing while rows decode is safe.
        """
        if not self.cuda_graphs:
            forward()
            return
        if self.pass_events is not None:
            import torch

            event: Any = torch.cuda.Event  # untyped constructor
            start, end = event(enable_timing=True), event(enable_timing=True)
            start.record()
            self._replay_graph(key, forward)
            end.record()
            self.pass_events.append((str(key[0]), start, end))
            return
        self._replay_graph(key, forward)

    def _replay_graph(self, key: tuple[Any, ...], forward: Any) -> None:
        graph = self._wide_graphs.get(key)
        if graph is None:
            import torch

            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = capture_graph(self.device, forward, pool=self._graph_pool)
            self._wide_graphs[key] = graph
        graph.replay()

    def forward_packed(self, size: int) -> None:
        """Keys, values and next-token logits (`logits`) of the packed chunks (`size` tokens).

        Per-token work (projections, MLP) runs over the packed tokens only; attention is
        per row (`chunk_attention`, or masked SDPA over the rows' padded chunks where the
        kernel does not apply). Writes no counter (`wide_step` grows them); static buffers
        only, so it can be captured in a CUDA graph.
        """
        base = self.base
        language_model = base.language_model
        tokens, owners, offsets = (
            self.packed[0, :size],
            self.packed[1, :size],
            self.packed[2, :size],
        )
        rows = min(self.slots, size)  # `load_chunks` keeps every row with a chunk below `size`
        starts, widths = self.packed[3, :rows], self.packed[4, :rows]
        lengths = self.lengths[:rows]
        positions = self.lengths[owners] + offsets  # the spare row's length stays 0
        hidden = language_model.embed_tokens(tokens[None, :])  # (1, size, hidden)
        cos, sin = language_model.rotary_emb(hidden, positions[None, :])
        cos, sin = cos[:, :, None], sin[:, :, None]
        for index, layer in enumerate(base.layers):
            query, key, value = base.rotated_projections(layer, hidden, cos, sin)
            keys, values = self.keys[index], self.values[index]
            keys[owners, :, positions] = key[0]
            values[owners, :, positions] = value[0]
            scale = layer.self_attn.scaling
            if self._split is not None:
                attended = chunk_attention(
                    query[0], keys, values, starts, widths, lengths, scale,
                    max_width=self.max_width,
                )  # fmt: skip
            else:
                attended = dense_chunk_attention(
                    query[0], keys[:rows], values[:rows], starts, widths, lengths, scale,
                    max_width=self.max_width,
                )  # fmt: skip
            attended = attended.reshape(1, size, base.heads * base.head_dim)
            hidden = base.layer_output(layer, hidden, attended)
        if self.position_ids is not None:
            self._position_argmax(hidden[0], size)
        last = hidden[0, (starts + widths - 1).clamp(min=0)]
        logits = base.lm_head(language_model.norm(last)[:, None, :])[:, -1, :].float()
        suppress = self.produced[:rows] + widths <= self.min_new[:rows]
        logits[:, self.eos_id] = logits[:, self.eos_id].masked_fill(suppress, -float("inf"))
        self.logits[:rows].copy_(logits)

    def _position_argmax(self, hidden: Any, size: int, block: int = 256) -> None:
        """The greedy choice after each packed token, `block` tokens of logits at a time."""
        base = self.base
        assert self.position_ids is not None
        for first in range(0, size, block):
            end = min(first + block, size)
            part = base.language_model.norm(hidden[first:end])
            logits = base.lm_head(part[:, None, :])[:, -1, :].float()
            self.position_ids[first:end] = logits.argmax(-1)
