"""The slot engine's constrained rounds: the host in the loop at every step.

When any request in flight carries an answer schema, `SlotScheduler.run_round` runs
`_constrained_round` instead of a free round: each step the bitmasks are filled while the
GPU runs the forward pass, and the tokens the grammar forces after a row's chosen token
are fed in the same step (`SlotDecoder.wide_step`). A mixin of `SlotScheduler`, which
owns the state named below; kept apart so each module holds one phase.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from processors.constrained import ConstrainedRows, model_departure
from processors.errors import ProcessingError
from processors.slot_decoder import SlotDecoder
from processors.slot_phases import timed_phase
from processors.slot_records import Completion, FinishReason, SlotEngineConfig, SlotWork

Ended = list[tuple[int, SlotWork, FinishReason]]


class ConstrainedRounds:
    """Constrained rounds over the state of a `SlotScheduler` (see the module docstring)."""

    config: SlotEngineConfig
    decoder: SlotDecoder
    constraint: ConstrainedRows | None
    follows_model: bool
    eos_id: int
    rows: list[SlotWork]
    waiting: deque[SlotWork]
    prefilling: SlotWork | None
    steps: int
    stats: dict[str, int]
    phase_s: dict[str, float]
    gpu_spans: list[tuple[str, Any, Any]] | None
    _wide_size: int
    _round_mixes: bool

    def _texts(self, ids: Sequence[int]) -> list[str]:
        raise NotImplementedError

    def _prefill_step(self) -> list[tuple[SlotWork, ProcessingError]]:
        raise NotImplementedError

    def _leave(self, ended: Ended) -> list[tuple[SlotWork, Completion]]:
        raise NotImplementedError

    def _constrained_round(
        self,
    ) -> tuple[list[tuple[SlotWork, Completion]], list[tuple[SlotWork, ProcessingError]]]:
        """Up to `steps_per_round` constrained steps, the host in the loop at every step.

        Each step feeds every row its chosen token and the tokens its grammar forces after
        it (`SlotDecoder.wide_step`); the bitmasks are filled while the forward pass runs;
        newcomers are prefilled after the step is queued; then one copy brings every row's
        new token to the host, where the matchers advance and the next forced runs are found.
        """
        constraint = self.constraint
        assert constraint is not None
        self._round_mixes = False  # a wide step carries no prompt chunk
        failed: list[tuple[SlotWork, ProcessingError]] = []
        completions: list[tuple[SlotWork, Completion]] = []
        done = 0
        while done < self.config.steps_per_round:
            stepped = len(self.rows)
            if stepped:
                size = self._wide_size = self._load_chunks()
                rows = range(stepped)

                def mask(logits: Any, rows: range = rows) -> None:
                    constraint.fill(rows)
                    constraint.apply(logits, rows=slice(0, rows.stop))

                self.decoder.wide_step(stepped, size, mask)
                for work in self.rows:
                    work.unseen = True
                self.steps += 1
                done += 1
                self.stats["steps"] += 1
                self.stats["constrained_steps"] += 1
                self.stats["active_rows"] += stepped
                self.stats["padded_rows"] += stepped
                self.stats["packed_tokens"] += size
            failed.extend(self._prefill_step())
            if not self.rows:
                if self.prefilling is None and not self.waiting:
                    break
                continue
            completions.extend(self._leave(self._take_tokens(stepped)))
        if done:
            self.stats["rounds"] += 1
        return completions, failed

    @timed_phase("chunks")
    def _load_chunks(self) -> int:
        """Queue each row's chunk (its chosen token, then its forced run) for the next step.

        The host has every row's chosen token by now (`_take_tokens`, or a free round's
        copy): it is the last token of the request before its forced run. Returns the
        packed size of the step (`SlotDecoder.load_chunks`).
        """
        chunks: list[list[int]] = []
        for work in self.rows:
            width = 1 + len(work.forced)
            work.chunk = work.tokens[len(work.tokens) - width :]
            chunks.append(work.chunk)
            self.stats["forced_tokens"] += width - 1
            work.fed += width
            work.forced = []
        return self.decoder.load_chunks(chunks)

    @timed_phase("tokens")
    def _take_tokens(self, stepped: int) -> list[tuple[int, SlotWork, FinishReason]]:
        """Bring every row's new token to the host; the rows that end.

        Rows [0, stepped) took the last step: their ids wait for that step only, so this
        host work overlaps the prefill queued after it; the rows activated since (their
        first tokens) wait for the prefill. Advances each constrained row's matcher with
        its token, then accepts the run the grammar forces next (fed by the next step),
        at most `forced_tokens` of them.
        """
        tokens = self.decoder.stepped_tokens(stepped)
        if self.follows_model and stepped:
            positions = self.decoder.stepped_positions(self._wide_size)
            start = 0
            for row in range(stepped):
                work = self.rows[row]
                width = len(work.chunk)
                if width > 1:  # the choices after the chunk's tokens but its last
                    followed = self._follow_model(row, work, positions[start : start + width - 1])
                    if followed is not None:
                        tokens[row] = followed
                start += width
        ended = self._advance_rows(0, tokens)
        if len(self.rows) > stepped:
            newcomers: list[int] = self.decoder.tokens[stepped : len(self.rows)].tolist()
            ended += self._advance_rows(stepped, newcomers)
        return ended

    def _advance_rows(
        self, first: int, tokens: list[int]
    ) -> list[tuple[int, SlotWork, FinishReason]]:
        """Take `tokens[i]` as row `first + i`'s new token (rows not unseen are skipped)."""
        constraint = self.constraint
        assert constraint is not None
        rows = range(first, first + len(tokens))
        fresh = [row for row in rows if self.rows[row].unseen]
        constraint.advance([tokens[row - first] for row in fresh], fresh)
        limit = self.config.forced_tokens
        ended: list[tuple[int, SlotWork, FinishReason]] = []
        texts = self._texts([tokens[row - first] for row in fresh])  # one call for all rows
        for row, text in zip(fresh, texts, strict=True):
            work = self.rows[row]
            work.unseen = False
            work.first = None
            token = tokens[row - first]
            reason = work.extend([token], self.eos_id, [text])
            if reason is None and work.matcher is not None:
                room = work.max_new - len(work.tokens) - 1
                forced = constraint.force(row, min(limit, room))
                if work.json is not None and self.follows_model:
                    work.json_before_forced = work.json.state()
                if forced:
                    reason = work.extend(forced, self.eos_id, self._texts(forced))
                    work.forced = forced
            if reason is not None:
                ended.append((row, work, reason))
        return ended

    def _follow_model(self, row: int, work: SlotWork, positions: list[int]) -> int | None:
        """The model's own token where it left the forced run `work.chunk[1:]`, else None.

        `positions[i]` is the model's greedy choice after the chunk's token i (one per
        forced token). At the departure (`model_departure`) the run is taken back: the
        request's tokens, the JSON watch, the matcher (left before the model's token,
        which the caller accepts as the step's choice) and the row's length go back
        there. The grammar's token stays where the model's choice is outside it.
        """
        constraint = self.constraint
        matcher = work.matcher
        if constraint is None or matcher is None or constraint.done[row]:
            return None
        forced = work.chunk[1:]
        departure = model_departure(matcher, forced, positions)
        if departure is None:
            return None
        index, model = departure
        dropped = len(forced) - index
        del work.tokens[len(work.tokens) - dropped :]
        if work.json is not None and work.json_before_forced is not None:
            work.json.restore(work.json_before_forced)
            for text in self._texts(forced[:index]):
                work.json.feed(text)
        self.decoder.rewind(row, dropped)
        work.fed -= dropped
        self.stats["forced_tokens"] -= dropped
        self.stats["forced_taken_back"] += dropped
        return model
