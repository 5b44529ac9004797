"""Decoding constrained by each request's answer schema: grammars, matchers and bitmasks.

Built on xgrammar (chosen by `bench/bench_grammar_mask.py`; README "Constrained
decoding"). Two pieces, both reusable by any decoder that picks one token per row per step
(the static decoder of `processors.internvl`, the slot engine of `processors.slot_engine`):

- `GrammarCache`: one per tokenizer; compiles an `AnswerSchema` (JSON Schema, fixed
  layout: indent 2 as in the prompt's answer format) into an xgrammar grammar, cached by
  the schema's key, so the returns of one product share one compilation.
- `ConstrainedRows`: one matcher per row (None = a free row). `fill(rows)` writes the
  next-token bitmask of those rows into a host buffer with the cache's thread pool (call it
  while the GPU runs the step); `apply(logits)` masks the logits on their device (one
  host-to-device copy of the bitmask, no synchronisation); `advance(tokens, rows)` moves the
  matchers after the argmax. `reset_row(row, schema)` gives a row to a new request (a slot
  engine refilling a slot).

The grammar admits a subset of the schema: xgrammar 0.2.9 writes a string with `maxLength`
without escape sequences, so free strings hold no quote, backslash or control character
(the copied constants keep theirs). A matcher stops at `<|im_end|>` (`stop_id`): once the
answer is complete, that is the only token its row may take. A row whose matcher refuses
a token (which `apply` makes impossible) or has terminated is `done`, and its bitmask
allows every token from then on, so a finished row never leaves a whole row of the
logits at minus infinity.

Failure behaviour: `GrammarCache.compiled` raises `ValueError` for a schema xgrammar
cannot compile; everything else is total.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

from processors.answer_schema import AnswerSchema

#: The answer layout, as the prompt's answer format writes it (`processors.prompt`).
INDENT: Final = 2
SEPARATORS: Final = (",", ": ")


def forced_tokens(matcher: Any, limit: int) -> list[int]:
    """Accept and return the tokens `matcher`'s grammar forces next (at most `limit`).

    The forced text (xgrammar's jump-forward string) in xgrammar's own split: the longest
    vocabulary tokens that cover it, without a last token that a longer one could extend
    (so the model still picks where the forced text meets free text). It may differ from
    the split the model would have chosen; the text is the same. A token the matcher
    refuses (not expected) ends the run there. Empty when nothing is forced.
    """
    # The forced string alone is about ten times cheaper to find than its tokens, and
    # most steps (inside free strings) force nothing.
    if limit <= 0 or matcher.is_terminated() or not matcher.find_jump_forward_string():
        return []
    forced: list[int] = []
    for token in matcher.find_jump_forward_tokens()[:limit]:
        if not matcher.accept_token(int(token)):
            break
        forced.append(int(token))
        if matcher.is_terminated():
            break
    return forced


def model_departure(
    matcher: Any, forced: Sequence[int], choices: Sequence[int]
) -> tuple[int, int] | None:
    """Where the model would have left a forced run it was fed: (index, its token), or None.

    `matcher` has accepted the run `forced`; `choices[i]` is the model's own greedy token
    where `forced[i]` was fed. The departure is the first i whose choice differs from
    `forced[i]` and is allowed by the grammar there too (the model splits the forced text
    otherwise, or leaves it where the grammar allows). Then the matcher is left after
    `forced[:i]`, the model's token not accepted; without one it is as it was.

    Raises:
        ValueError: the matcher refuses the run it accepted before (a matcher misused).
    """
    matcher.rollback(len(forced))
    for index, token in enumerate(forced):
        choice = int(choices[index])
        if choice != token and matcher.accept_token(choice):
            matcher.rollback(1)
            return index, choice
        if not matcher.accept_token(int(token)):
            raise ValueError(f"the matcher refuses forced token {token} at {index}")
    return None


class GrammarCache:
    """Compiled answer grammars for one tokenizer, least recently used dropped first.

    `vocab_size` is the width of the model's logits (the lm_head may be padded past the
    tokenizer); bitmasks cover all of it, and ids the tokenizer does not know are never
    allowed. `threads` fill the bitmasks of a batch in parallel.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        stop_id: int,
        threads: int = 4,
        max_grammars: int = 256,
    ) -> None:
        import xgrammar

        self.xgrammar = xgrammar
        self.vocab_size = vocab_size
        self.stop_id = stop_id
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[stop_id]
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self._max_grammars = max_grammars
        self._lock = threading.Lock()
        self.compilations = 0
        # Seconds spent filling bitmasks and the number of fills (one per decode step).
        self.fill_s = 0.0
        self.fill_steps = 0

    def compiled(self, schema: AnswerSchema) -> Any:
        """The compiled grammar of `schema` (compiled once per key)."""
        with self._lock:
            found = self._grammars.get(schema.key)
            if found is not None:
                self._grammars.move_to_end(schema.key)
                return found
        try:
            grammar = self._compiler.compile_json_schema(
                schema.text, any_whitespace=False, indent=INDENT, separators=SEPARATORS
            )
        except RuntimeError as exc:
            raise ValueError(f"answer schema does not compile: {exc}") from exc
        with self._lock:
            self.compilations += 1
            self._grammars[schema.key] = grammar
            while len(self._grammars) > self._max_grammars:
                self._grammars.popitem(last=False)
        return grammar

    def matcher(self, schema: AnswerSchema) -> Any:
        """A fresh xgrammar matcher of `schema`'s grammar that stops at the stop token."""
        return self.xgrammar.GrammarMatcher(
            self.compiled(schema), override_stop_tokens=[self.stop_id]
        )


class ConstrainedRows:
    """Per-row matchers of one batch and the host bitmask they fill (see module doc).

    `schemas[i]` is row i's schema, or None for a row decoded freely.
    """

    def __init__(self, cache: GrammarCache, schemas: Sequence[AnswerSchema | None]) -> None:
        import torch

        self.cache = cache
        self._xgr = cache.xgrammar
        self.rows = len(schemas)
        self.matchers: list[Any] = [None if s is None else cache.matcher(s) for s in schemas]
        self.done = [m is None for m in self.matchers]
        # Pinned on CUDA hosts, so the copy to the GPU is asynchronous.
        bitmask = self._xgr.allocate_token_bitmask(self.rows, cache.vocab_size)
        self.bitmask = bitmask.pin_memory() if torch.cuda.is_available() else bitmask
        self.bitmask.fill_(-1)
        self._device_bitmask: Any = None

    @property
    def active(self) -> bool:
        """Whether any row is still constrained (a matcher not yet terminated)."""
        return not all(self.done)

    def reset_row(self, row: int, schema: AnswerSchema | None) -> None:
        """Give `row` to a new request (a fresh matcher, or free when `schema` is None)."""
        self.matchers[row] = None if schema is None else self.cache.matcher(schema)
        self.done[row] = schema is None
        self.bitmask[row].fill_(-1)

    def set_row(self, row: int, matcher: Any) -> None:
        """Give `row` an existing matcher (None: free), e.g. one advanced before prefill."""
        self.matchers[row] = matcher
        self.done[row] = matcher is None or bool(matcher.is_terminated())
        self.bitmask[row].fill_(-1)

    def move_row(self, source: int, target: int) -> None:
        """Move `source`'s matcher to `target` (a slot engine compacting rows); frees it."""
        if source != target:
            self.matchers[target] = self.matchers[source]
            self.done[target] = self.done[source]
        self.matchers[source] = None
        self.done[source] = True
        self.bitmask[source].fill_(-1)

    def fill(self, rows: Sequence[int] | None = None) -> None:
        """Next-token bitmasks of `rows` (default all) that are still constrained."""
        wanted = range(self.rows) if rows is None else rows
        live = [r for r in wanted if not self.done[r]]
        for row in wanted:
            if self.done[row]:
                self.bitmask[row].fill_(-1)
        if live:
            started = time.perf_counter()
            self.cache.batch.batch_fill_next_token_bitmask(
                [self.matchers[r] for r in live], self.bitmask, indices=live
            )
            self.cache.fill_s += time.perf_counter() - started
            self.cache.fill_steps += 1

    def apply(self, logits: Any, rows: slice | None = None) -> None:
        """Mask `logits` (rows x vocab, any device) in place with the host bitmask.

        `rows` selects the bitmask rows that match `logits` (default all). The copy to the
        GPU is non-blocking; no synchronisation happens here.
        """
        bitmask = self.bitmask if rows is None else self.bitmask[rows]
        if logits.device.type != "cpu":
            if self._device_bitmask is None:
                self._device_bitmask = self.bitmask.to(logits.device)
            target = self._device_bitmask if rows is None else self._device_bitmask[rows]
            target.copy_(bitmask, non_blocking=True)
            bitmask = target
        self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.cache.vocab_size)

    def advance(self, tokens: Sequence[int], rows: Sequence[int] | None = None) -> None:
        """Feed each row its chosen token (`tokens[i]` to `rows[i]`, default rows 0..n-1)."""
        # One call per row: xgrammar's batch_accept_token measured slower at 32 rows.
        chosen = range(len(tokens)) if rows is None else rows
        for row, token in zip(chosen, tokens, strict=True):
            matcher = self.matchers[row]
            if self.done[row] or matcher is None:
                continue
            if not matcher.accept_token(int(token)) or matcher.is_terminated():
                self.done[row] = True

    def force(self, row: int, limit: int) -> list[int]:
        """Accept and return the tokens the grammar forces next in `row` (`forced_tokens`)."""
        matcher = self.matchers[row]
        if self.done[row] or matcher is None:
            return []
        forced = forced_tokens(matcher, limit)
        if matcher.is_terminated():
            self.done[row] = True
        return forced
