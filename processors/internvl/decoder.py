"""Greedy decoding of the InternVL language model (Qwen2) over a static KV cache.

`StaticGreedyDecoder` prefills right-padded prompts layer by layer into preallocated
per-layer key/value buffers and decodes greedily, one token per row per step; on CUDA each
step is captured once per (batch, cache length) shape as a CUDA graph and replayed. The
decode attention is the split-key kernel (`processors.internvl.decode_attention`, CUDA)
or one masked `scaled_dot_product_attention`. Greedy ids equal `generate`'s in float32.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from processors.constrained import ConstrainedRows
from processors.errors import ErrorCode, ProcessingError
from processors.internvl.config import STAGE
from processors.internvl.cuda import capture_graph
from processors.internvl.decode_attention import SplitKeyAttention
from processors.internvl.fused import fuse_layer, fused_of, mlp_output, project_fused


def attention_geometry(text_config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a Qwen2 text config."""
    heads = int(text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return heads, int(text_config.num_key_value_heads), int(head_dim)


@dataclass
class DecodeSession:
    """Static buffers of one (batch, cache length) shape, and its CUDA graph if any."""

    batch: int
    length: int
    keys: list[Any]
    values: list[Any]
    tokens: Any  # (batch,) the token fed to the next step
    pads: Any  # (batch,) right-padding columns of each row's prompt
    prompt_end: Any  # () padded prompt length: generated tokens start at this column
    column: Any  # () cache column the next step writes
    step: Any  # () index of the token the next step produces
    out: Any  # (batch, max_new_tokens) generated ids
    graph: Any = None
    prompt_length: int = 0  # padded prompt length of the rows now in the buffers
    forward_graph: Any = None  # constrained decoding: the step up to the logits only
    logits: Any = None  # the forward graph's output (batch, vocab)


class StaticGreedyDecoder:
    """Greedy decoding of the InternVL language model (Qwen2) over a static KV cache.

    Prefill runs the checkpoint's own modules (norms, projections, MLP, rotary embedding)
    layer by layer, as `Qwen2DecoderLayer` does, on prompts padded on the right: causal
    attention never looks at a later pad, so no mask is needed and the fused causal kernel
    runs; positions are 0..n-1 as with left padding. Each layer's key/value states go
    straight into preallocated per-layer buffers of shape (batch, kv heads, length, head
    dim); generated tokens go to the columns after the padded prompt. Each decode step
    reuses the same modules (norms, projections, MLP, rotary embedding, lm_head) with the
    attention written here: the grouped query heads of a key/value head attend together
    to the row's real prompt and its generated tokens, through the split-key kernel
    (`processors.internvl.decode_attention`, CUDA) or one masked `scaled_dot_product_attention`
    call. The step only touches static buffers, so on CUDA it is captured once per shape
    as a CUDA graph and replayed (no host work per token). `compile_step` and
    `compile_prefill` compile the per-layer functions (one compilation for all layers).
    `fuse_projections` runs each layer's query/key/value and gate/up projections as one
    matrix product each (`processors.internvl.fused`; the modules' weights become views).
    `min_new_tokens` suppresses `<|im_end|>` exactly as
    `MinNewTokensLengthLogitsProcessor` does.
    """

    max_sessions = 2
    launch_ahead = 128

    def __init__(
        self,
        model: Any,
        *,
        eos_id: int,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        length_bucket: int = 256,
        cuda_graphs: bool = True,
        check_every: int = 16,
        compile_step: bool = False,
        compile_prefill: bool = False,
        split_attention: bool = False,
        attention_splits: int = 0,
        fuse_projections: bool = False,
    ) -> None:
        import torch

        self.model = model
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        text = self.language_model.config
        self.layers = list(self.language_model.layers[: text.num_hidden_layers])
        if fuse_projections:
            for layer in self.layers:
                fuse_layer(layer)
        self.heads, self.kv_heads, self.head_dim = attention_geometry(text)
        self.image_token_id = int(model.config.image_token_id)
        self.eos_id = eos_id
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.length_bucket = length_bucket
        self.cuda_graphs = cuda_graphs
        self.check_every = check_every
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype
        self._sessions: OrderedDict[tuple[int, int], DecodeSession] = OrderedDict()
        self._split_attention: SplitKeyAttention | None = None
        if split_attention:
            if not SplitKeyAttention.supports(self.head_dim, self.heads // self.kv_heads):
                raise ValueError(
                    f"the split-key attention does not support head_dim {self.head_dim} with "
                    f"{self.heads // self.kv_heads} query heads per key/value head"
                )
            self._split_attention = SplitKeyAttention(splits=attention_splits)
        self._run_decode_layer: Any = self._decode_layer
        if compile_step:
            self._run_decode_layer = torch.compile(self._decode_layer, dynamic=True)
        self._run_prefill_layer: Any = self._prefill_layer
        if compile_prefill:
            self._run_prefill_layer = torch.compile(self._prefill_layer, dynamic=True)
        self.compile_error: str | None = None

    @property
    def split_attention(self) -> bool:
        """Whether decode steps use the split-key kernel (else masked SDPA)."""
        return self._split_attention is not None

    @property
    def split_key_attention(self) -> SplitKeyAttention | None:
        """The split-key attention operator of the decode steps (None: masked SDPA)."""
        return self._split_attention

    @property
    def prefill_layer(self) -> Callable[[Any, Any, Any, Any], tuple[Any, Any, Any]]:
        """One decoder layer over whole prompts, compiled when `compile_prefill` was set.

        Called as `(layer, hidden, cos, sin)`; returns (hidden out, rotated keys, values).
        """
        run: Callable[[Any, Any, Any, Any], tuple[Any, Any, Any]] = self._run_prefill_layer
        return run

    def rotated_projections(
        self, layer: Any, hidden: Any, cos: Any, sin: Any
    ) -> tuple[Any, Any, Any]:
        """A layer's query, key and value, (batch, length, heads, dim), rotary applied."""
        return self._rotated_projections(layer, hidden, cos, sin)

    @staticmethod
    def layer_output(layer: Any, hidden: Any, attended: Any) -> Any:
        """The rest of a layer after attention: output projection, residuals and MLP."""
        return StaticGreedyDecoder._layer_output(layer, hidden, attended)

    # ----------------------------------------------------------------- sessions

    def cache_length(self, prompt_length: int) -> int:
        """The bucketed static cache length for prompts of `prompt_length` tokens."""
        needed = prompt_length + self.max_new_tokens
        return -(-needed // self.length_bucket) * self.length_bucket

    def session(self, batch: int, prompt_length: int) -> DecodeSession:
        """The static buffers (and graph) for this batch size and bucketed length.

        `prompt_length` is the chunk's longest prompt: generated tokens go to the columns
        from there on, whatever the padded width of each prefill call.
        """
        found = self._session(batch, self.cache_length(prompt_length))
        found.prompt_length = prompt_length
        found.prompt_end.fill_(prompt_length)
        return found

    def _session(self, batch: int, length: int) -> DecodeSession:
        import torch

        key = (batch, length)
        found = self._sessions.get(key)
        if found is not None:
            self._sessions.move_to_end(key)
            return found
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        shape = (batch, self.kv_heads, length, self.head_dim)
        options = {"device": self.device, "dtype": self.dtype}
        session = DecodeSession(
            batch=batch,
            length=length,
            keys=[torch.zeros(shape, **options) for _ in self.layers],
            values=[torch.zeros(shape, **options) for _ in self.layers],
            tokens=torch.zeros(batch, dtype=torch.long, device=self.device),
            pads=torch.zeros(batch, dtype=torch.long, device=self.device),
            prompt_end=torch.zeros((), dtype=torch.long, device=self.device),
            column=torch.zeros((), dtype=torch.long, device=self.device),
            step=torch.zeros((), dtype=torch.long, device=self.device),
            out=torch.zeros((batch, self.max_new_tokens), dtype=torch.long, device=self.device),
        )
        if self.cuda_graphs:
            try:
                session.graph = self._capture(session)
            except Exception as exc:  # a compiled step that cannot be captured: run eagerly
                if self._run_decode_layer == self._decode_layer:
                    raise
                self.compile_error = f"{type(exc).__name__}: {exc}"[:500]
                self._run_decode_layer = self._decode_layer
                session.graph = self._capture(session)
        self._sessions[key] = session
        return session

    def _capture(self, session: DecodeSession) -> Any:
        def reset() -> None:
            session.column.zero_()
            session.step.zero_()

        return capture_graph(self.device, lambda: self._step(session), reset=reset)

    # ------------------------------------------------------------------ prefill

    def prefill(
        self,
        session: DecodeSession,
        first_row: int,
        input_ids: Any,
        lengths: Any,
        image_features: Any,
        image_tokens: int | None = None,
        constraint: ConstrainedRows | None = None,
    ) -> Any:
        """Prefill rows [first_row, first_row + len(input_ids)) of `session`.

        `input_ids` are right-padded to their own longest prompt (at most the session's
        `prompt_length`: a call of short prompts computes no padding up to the chunk's
        longest); `lengths` holds each row's real length. Returns the first generated
        token of each row (greedy, `<|im_end|>` suppressed while min_new_tokens is not
        reached). `image_tokens`, the count of image tokens in `input_ids` when the caller
        knows it (from host memory), spares a device synchronisation to count them.
        `constraint` (its bitmask filled for these rows) masks the first token instead of
        the `<|im_end|>` suppression.
        """
        import torch

        language_model = self.language_model
        embeds = language_model.embed_tokens(input_ids)
        if image_features is not None:
            image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
            if image_tokens is None:
                image_tokens = int(image_mask.sum())
            if image_tokens * embeds.shape[-1] != image_features.numel():
                raise ProcessingError(
                    ErrorCode.INVALID_REQUEST,
                    "image features and image tokens do not match",
                    STAGE,
                )
            embeds = embeds.masked_scatter(image_mask, image_features.to(embeds.dtype))
        batch, width = int(input_ids.shape[0]), int(input_ids.shape[1])
        if width > session.prompt_length:
            raise ValueError(
                f"prompt of {width} tokens is longer than the session's {session.prompt_length}"
            )
        position_ids = torch.arange(width, device=input_ids.device)[None, :]
        cos, sin = language_model.rotary_emb(embeds, position_ids)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (1, width, 1, head_dim): rows alike
        rows = slice(first_row, first_row + batch)
        hidden = embeds
        for index, layer in enumerate(self.layers):
            hidden, key, value = self._run_prefill_layer(layer, hidden, cos, sin)
            session.keys[index][rows, :, :width] = key
            session.values[index][rows, :, :width] = value
        session.pads[rows] = session.prompt_length - lengths
        # The final norm is per token: normalise only each row's last real token.
        last = hidden[torch.arange(batch, device=lengths.device), lengths - 1]
        last = language_model.norm(last)
        logits = self.lm_head(last[:, None, :])[:, -1, :].float()
        if constraint is not None:
            constraint.apply(logits, rows)
        elif self.min_new_tokens > 0:
            logits[:, self.eos_id] = -float("inf")
        return logits.argmax(-1)

    def _prefill_layer(self, layer: Any, hidden: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        """One decoder layer over whole prompts: (hidden out, rotated keys, values).

        The computation of `Qwen2DecoderLayer` with causal attention and no cache object
        (the caller writes keys and values straight into the static buffers); a free
        function of its tensors, so one compilation serves every layer and shape.
        """
        import torch.nn.functional as functional

        batch, length = hidden.shape[0], hidden.shape[1]
        query, key, value = self._rotated_projections(layer, hidden, cos, sin)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        attended = functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=layer.self_attn.scaling, enable_gqa=True
        )
        attended = attended.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self._layer_output(layer, hidden, attended), key, value

    def _rotated_projections(
        self, layer: Any, hidden: Any, cos: Any, sin: Any
    ) -> tuple[Any, Any, Any]:
        """A layer's query, key and value, (batch, length, heads, dim), rotary applied.

        The rotary embedding works in the projections' own layout: a transposed copy
        would cost several times as much; attention then takes transposed views.
        """
        batch, length = hidden.shape[0], hidden.shape[1]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        fused = fused_of(attention)
        if fused is not None:
            query, key, value = project_fused(fused, normed)
        else:
            query, key, value = (
                attention.q_proj(normed),
                attention.k_proj(normed),
                attention.v_proj(normed),
            )
        query = query.view(batch, length, self.heads, self.head_dim)
        key = key.view(batch, length, self.kv_heads, self.head_dim)
        value = value.view(batch, length, self.kv_heads, self.head_dim)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        return query, key, value

    @staticmethod
    def _layer_output(layer: Any, hidden: Any, attended: Any) -> Any:
        """The rest of the layer after attention: output projection, residuals, MLP."""
        hidden = hidden + layer.self_attn.o_proj(attended)
        return hidden + mlp_output(layer.mlp, layer.post_attention_layernorm(hidden))

    # ------------------------------------------------------------------- decode

    def decode(
        self,
        session: DecodeSession,
        first_tokens: Any,
        while_running: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """Greedy tokens of every row (max_new_tokens each, early exit once all ended).

        `while_running` is called once the first `launch_ahead` steps are queued on the
        GPU (before any wait), so host work for the next batch overlaps this decode.
        """
        session.tokens.copy_(first_tokens)
        session.out[:, 0] = first_tokens
        session.step.fill_(1)
        session.column.fill_(session.prompt_length)
        produced = 1
        pending = while_running
        while produced < self.max_new_tokens:
            if session.graph is not None:
                session.graph.replay()
            else:
                self._step(session)
            produced += 1
            if pending is not None:
                if produced < min(self.launch_ahead, self.max_new_tokens):
                    continue  # no early-exit checks (they wait for the GPU) until it ran
                pending()
                pending = None
            if produced % self.check_every == 0 and self._all_ended(session, produced):
                break
        if pending is not None:
            pending()
        rows: list[list[int]] = session.out[:, :produced].tolist()
        return rows

    def decode_constrained(
        self,
        session: DecodeSession,
        first_tokens: Any,
        constraint: ConstrainedRows,
        while_running: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """Greedy tokens of every row, each constrained row inside its grammar.

        Per step: the forward pass is queued (one CUDA graph up to the logits), the
        bitmasks are filled on CPU threads meanwhile, then applied on the device before
        the argmax; the chosen ids come back to the host (the one synchronisation of the
        step, which the matchers need) and advance the matchers. Stops once every row has
        ended (`<|im_end|>`) or at `max_new_tokens`. `min_new_tokens` is not applied: a
        complete answer may only end. `while_running` is called after the first step
        is queued.
        """
        import torch

        session.tokens.copy_(first_tokens)
        session.out[:, 0] = first_tokens
        session.step.fill_(1)
        session.column.fill_(session.prompt_length)
        host: list[int] = first_tokens.tolist()
        constraint.advance(host)
        ended = [token == self.eos_id for token in host]
        produced = 1
        on_cuda = self.device.type == "cuda"
        chosen_host = torch.empty(session.batch, dtype=torch.long, pin_memory=on_cuda)
        if on_cuda and self.cuda_graphs and session.forward_graph is None:
            self._capture_forward(session)
        pending = while_running
        while produced < self.max_new_tokens and not all(ended):
            if session.forward_graph is not None:
                session.forward_graph.replay()
                logits = session.logits
            else:
                logits = self._forward(session)
            if pending is not None:
                pending()
                pending = None
            constraint.fill()  # on CPU threads, while the GPU runs the forward pass
            constraint.apply(logits)
            chosen = logits.argmax(-1)
            self._commit(session, chosen)
            chosen_host.copy_(chosen, non_blocking=on_cuda)
            if on_cuda:
                torch.cuda.current_stream(self.device).synchronize()
            host = chosen_host.tolist()
            constraint.advance(host)
            ended = [done or token == self.eos_id for done, token in zip(ended, host, strict=True)]
            produced += 1
        if pending is not None:
            pending()
        rows: list[list[int]] = session.out[:, :produced].tolist()
        return rows

    def _capture_forward(self, session: DecodeSession) -> None:
        """Capture the step up to the logits as a CUDA graph (`session.logits` its output).

        The warm-up runs advance no counter, so the session's state is left as it was.
        """

        def forward() -> None:
            session.logits = self._forward(session)

        session.forward_graph = capture_graph(self.device, forward)

    def _all_ended(self, session: DecodeSession, produced: int) -> bool:
        if produced < self.min_new_tokens:
            return False
        return bool((session.out[:, :produced] == self.eos_id).any(-1).all())

    def _step(self, session: DecodeSession) -> None:
        """One greedy step for every row, on static buffers only (graph-capturable)."""
        logits = self._forward(session)
        if self.min_new_tokens > 0:
            suppress = session.step < self.min_new_tokens
            logits[:, self.eos_id] = logits[:, self.eos_id].masked_fill(suppress, -float("inf"))
        self._commit(session, logits.argmax(-1))

    def _commit(self, session: DecodeSession, chosen: Any) -> None:
        """Record the chosen tokens and move every row one column on."""
        session.out.index_copy_(1, session.step.view(1), chosen[:, None])
        session.tokens.copy_(chosen)
        session.column.add_(1)
        session.step.add_(1)

    def _forward(self, session: DecodeSession) -> Any:
        """The logits (batch, vocab, float32) of the next token of every row."""
        import torch

        # Sizes from tensor shapes (not the session's ints): a compiled layer with dynamic
        # shapes then serves every batch size and cache length without recompiling.
        length = session.keys[0].shape[2]
        language_model = self.language_model
        hidden = language_model.embed_tokens(session.tokens[:, None])  # (batch, 1, hidden)
        prompt_lengths = session.prompt_end - session.pads
        positions = (session.column - session.pads)[:, None]  # real length + generated
        cos, sin = language_model.rotary_emb(hidden, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (batch, 1, 1, head_dim): heads alike
        mask = None
        if self._split_attention is None:
            columns = torch.arange(length, device=session.tokens.device)[None, :]
            prompt = columns < prompt_lengths[:, None]
            generated = (columns >= session.prompt_end) & (columns <= session.column)
            mask = (prompt | generated)[:, None, None, :]  # (batch, 1, 1, length)
        for index, layer in enumerate(self.layers):
            hidden = self._run_decode_layer(
                layer,
                hidden,
                cos,
                sin,
                session.keys[index],
                session.values[index],
                session.column,
                session.prompt_end,
                prompt_lengths,
                mask,
            )
        hidden = language_model.norm(hidden)
        return self.lm_head(hidden)[:, -1, :].float()

    def _decode_layer(
        self,
        layer: Any,
        hidden: Any,
        cos: Any,
        sin: Any,
        keys: Any,
        values: Any,
        column: Any,
        prompt_end: Any,
        prompt_lengths: Any,
        mask: Any,
    ) -> Any:
        """One decoder layer for one new token per row; writes its key/value at `column`.

        Attention covers each row's prompt and generated tokens: through the split-key
        kernel on CUDA (reads only those columns), else one masked
        `scaled_dot_product_attention` over the whole buffer (`mask` is then required).
        """
        import torch.nn.functional as functional

        batch = hidden.shape[0]
        scale = layer.self_attn.scaling
        query, key, value = self._rotated_projections(layer, hidden, cos, sin)
        where = column.view(1)
        keys.index_copy_(2, where, key.transpose(1, 2))
        values.index_copy_(2, where, value.transpose(1, 2))
        # Query heads h*group .. h*group+group-1 share key/value head h (repeat_kv order).
        grouped = query.reshape(batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        if self._split_attention is not None:
            attended = self._split_attention(
                grouped, keys, values, prompt_lengths, prompt_end, column, scale
            )
        else:
            attended = functional.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=mask, scale=scale
            )
        attended = attended.reshape(batch, 1, self.heads * self.head_dim)
        return self._layer_output(layer, hidden, attended)


def rotate_half(x: Any) -> Any:
    """`x` with its last dimension's halves swapped and the new first half negated (rotary)."""
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
