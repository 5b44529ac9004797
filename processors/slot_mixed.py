"""Decode steps that carry a chunk of a newcomer's prompt (mixed passes).

A decode step of a few dozen rows costs an H200 about 2 ms whatever the row count: it
reads every weight and launches every layer's kernels for a handful of tokens
(`bench/results/profile-kernels-h200.json`). A prefill pass of a prompt is
compute-bound. `MixedStep` runs both in one forward pass, as Sarathi-Serve does: rows
[0, b) feed their next token exactly as in `SlotDecoder.step`, and `chunk` tokens of
one newcomer's prompt go into staging row 0 at columns [start, start + chunk), so
the projections and the MLP run once over b + chunk tokens and the rows' step costs
little more than their attention. Attention stays apart: the split-key kernel (or
masked SDPA) for the rows, `chunk_attention` (or its dense reference) over staging
row 0 for the chunk, each chunk token seeing the columns before it.

A chunk is `chunk` tokens, or for a prompt's last part the smallest of `chunk_widths`
that holds it (powers of two from 128: a padded chunk computes at most twice its real
tokens; its pads write staging columns past the prompt, which nothing reads, so a prompt
must leave `chunk` columns free). Its start and real width live in device tensors, so
one CUDA graph per (batch size of the decoder's ladder, chunk width) serves every chunk.

The rows' end of step is `SlotDecoder.advance`, so to the scheduler a mixed step is a
decode step that also moves a prompt on; after the prompt's last chunk `first_token`
gives its greedy first token, and the scheduler moves the staging row into a slot as
after any prefill. Not thread-safe: the scheduler's thread drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from processors.internvl import capture_graph, chunk_attention, dense_chunk_attention
from processors.slot_decoder import SlotDecoder
from processors.slot_prefill import prompt_embeddings

CHUNK_BLOCK_M = 64
"""Queries per program of the chunk's attention (`chunk_attention`'s `block_m`)."""

SMALLEST_CHUNK = 128


def chunk_widths(chunk: int) -> list[int]:
    """Captured chunk widths: powers of two from 128 below `chunk`, then `chunk`."""
    widths = {chunk}
    width = SMALLEST_CHUNK
    while width < chunk:
        widths.add(width)
        width *= 2
    return sorted(widths)


class MixedStep:
    """One decode step of rows [0, b) plus `chunk` prompt tokens into staging row 0."""

    def __init__(self, decoder: SlotDecoder, chunk: int, *, compile_layers: bool) -> None:
        import torch

        if chunk < 1 or chunk >= decoder.context:
            raise ValueError(f"chunk must be in [1, {decoder.context}), got {chunk}")
        self.decoder = decoder
        self.chunk = chunk
        self.widths = chunk_widths(chunk)
        self.loaded = chunk  # the width of the chunk `load` queued last
        base = decoder.base
        self.base = base
        device = decoder.device
        hidden = int(base.language_model.embed_tokens.embedding_dim)
        vocab = int(base.lm_head.out_features)

        def longs(size: int) -> Any:
            return torch.zeros(size, dtype=torch.long, device=device)

        self.embeds = torch.zeros((chunk, hidden), dtype=decoder.dtype, device=device)
        self.start = longs(1)  # the chunk's first column in staging row 0
        self.width = longs(1)  # its real tokens (the rest is padding)
        self.zero = longs(1)  # every chunk starts at packed token 0
        self.offsets = torch.arange(chunk, device=device)
        self.stage_rows = longs(chunk)  # staging row 0 for every chunk token
        self.logits = torch.zeros((1, vocab), dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.long, device=device)
        self._zero = self.zero[0]  # the split-key kernel's empty generated range
        self._front: Any = base.rotated_projections
        self._back: Any = base.layer_output
        if compile_layers:
            self._front = torch.compile(base.rotated_projections, dynamic=True)
            self._back = torch.compile(base.layer_output, dynamic=True)
        self._graphs: dict[tuple[int, int], Any] = {}
        self._pool: Any = None
        self.capture_error: str | None = None  # why mixed steps run eagerly on CUDA, if so

    def fits(self, prompt_length: int) -> bool:
        """Whether a prompt of this length can go in mixed steps (its padded last chunk fits)."""
        return prompt_length + self.chunk <= self.decoder.prefill.context

    def load(self, ids: Sequence[int], start: int, image_features: Any) -> None:
        """Queue the next step's chunk: prompt `ids` (at most `chunk`) from column `start`.

        `image_features` holds the projected features of the chunk's image tokens in
        order, (tokens, hidden), or None. Never waits for the GPU.
        """
        if not 0 < len(ids) <= self.chunk:
            raise ValueError(f"a chunk of {len(ids)} tokens for a width of {self.chunk}")
        decoder = self.decoder
        self.loaded = next(width for width in self.widths if width >= len(ids))
        padded = [*ids, *[decoder.eos_id] * (self.loaded - len(ids))]
        input_ids = decoder.to_device([padded], pad=decoder.eos_id)
        self.embeds[: self.loaded].copy_(prompt_embeddings(self.base, input_ids, image_features)[0])
        self.start.fill_(start)
        self.width.fill_(len(ids))

    def step(self, active: int) -> None:
        """One decode step of rows [0, active) carrying the loaded chunk; queued, no wait."""
        shape = (self.decoder.batch_for(active), self.loaded)
        graph = self._graphs.get(shape)
        if graph is None and self.decoder.cuda_graphs and self.capture_error is None:
            graph = self._capture(*shape)
        if graph is None:
            self._forward(*shape)
        else:
            graph.replay()

    def first_token(self, min_new: int) -> Any:
        """The greedy token after the last chunk's last real token, (1,) on the device."""
        logits = self.logits.clone()
        if min_new > 0:
            logits[:, self.decoder.eos_id] = -float("inf")
        return logits.argmax(-1)

    def capture(self) -> None:
        """Capture every (ladder size, chunk width) (CUDA with graphs on); no row may decode.

        The warm-up runs write staging row 0 (which holds nothing between prompts) and
        column 0 of free rows. A pass that cannot be captured leaves mixed steps eager
        (same results, slower); the reason is kept in `capture_error`.
        """
        if not self.decoder.cuda_graphs:
            return
        for batch in self.decoder.ladder:
            for width in self.widths:
                if (batch, width) not in self._graphs and self._capture(batch, width) is None:
                    return
        self.decoder.round_step.zero_()

    def _capture(self, batch: int, width: int) -> Any:
        import torch

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph = capture_graph(
                self.decoder.device,
                lambda: self._forward(batch, width),
                pool=self._pool,
                reset=self.decoder.round_step.zero_,
            )
        except RuntimeError as exc:  # torch's capture and compile errors are RuntimeErrors
            self.capture_error = f"{type(exc).__name__}: {exc}"[:500]
            self._graphs.clear()
            return None
        self._graphs[batch, width] = graph
        return graph

    def _forward(self, batch: int, width: int) -> None:
        """The pass over rows [0, batch) and a chunk of `width`, on static buffers only."""
        import torch

        decoder, base = self.decoder, self.base
        language_model = base.language_model
        lengths = decoder.lengths[:batch]
        stage_columns = self.start + self.offsets[:width]
        stage_rows = self.stage_rows[:width]
        embeds = self.embeds[:width]
        hidden = torch.cat([language_model.embed_tokens(decoder.tokens[:batch]), embeds])
        hidden = hidden[None]  # (1, batch + chunk, hidden)
        positions = torch.cat([lengths, stage_columns])[None]
        cos, sin = language_model.rotary_emb(hidden, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]
        visible = lengths + 1
        rows = decoder.rows[:batch]
        mask = None
        split = base.split_key_attention
        if split is None:
            columns = torch.arange(decoder.context, device=decoder.device)[None, :]
            mask = (columns < visible[:, None])[:, None, None, :]
        group = base.heads // base.kv_heads
        for index, layer in enumerate(base.layers):
            query, key, value = self._front(layer, hidden, cos, sin)
            keys, values = decoder.keys[index][:batch], decoder.values[index][:batch]
            keys[rows, :, lengths] = key[0, :batch]
            values[rows, :, lengths] = value[0, :batch]
            stage_keys, stage_values = decoder.prefill.keys[index], decoder.prefill.values[index]
            stage_keys[stage_rows, :, stage_columns] = key[0, batch:]
            stage_values[stage_rows, :, stage_columns] = value[0, batch:]
            scale = layer.self_attn.scaling
            grouped = query[0, :batch].reshape(batch, base.kv_heads, group, base.head_dim)
            if split is not None:
                decoded = split(grouped, keys, values, visible, self._one, self._zero, scale)
                chunked = chunk_attention(
                    query[0, batch:], stage_keys, stage_values, self.zero, self.width,
                    self.start, scale, max_width=width, block_m=CHUNK_BLOCK_M,
                )  # fmt: skip
            else:
                decoded = torch.nn.functional.scaled_dot_product_attention(
                    grouped, keys, values, attn_mask=mask, scale=scale
                )
                chunked = dense_chunk_attention(
                    query[0, batch:], stage_keys[:1], stage_values[:1], self.zero, self.width,
                    self.start, scale, max_width=width,
                )  # fmt: skip
            size = base.heads * base.head_dim
            attended = torch.cat([decoded.reshape(batch, size), chunked.reshape(width, size)])
            hidden = self._back(layer, hidden, attended[None])
        last = torch.cat([decoder.rows[:batch], batch + self.width - 1])
        final = language_model.norm(hidden[0, last])
        logits = base.lm_head(final[:, None, :])[:, -1, :].float()
        self.logits.copy_(logits[batch:])
        decoder.advance(batch, logits[:batch])
