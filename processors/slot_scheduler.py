"""The slot engine's synchronous core: admission, chunked prefill and decode rounds.

One thread drives a `SlotScheduler` (see `processors.slot_engine` for the design and the
streaming front); only `prepare`, a request's host work before it is admitted, may run
on another. Rounds end without a stream sync: the ids go out through a pinned copy, and
the vision of the requests admitted meanwhile is queued before the host waits for them.
Free rows decode in rounds of `steps_per_round` steps with one copy of the new ids to
the host per round; when any request in flight carries an answer schema (constrained
decoding), rounds step with the host in the loop: each step the bitmasks are filled
while the GPU runs the forward pass, and the tokens the grammar forces after a row's
chosen token are fed in the same step (`SlotDecoder.wide_step`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from processors.constrained import (
    ConstrainedRows,
    GrammarCache,
    forced_tokens,
)
from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import IM_END_TOKEN, NativeInternVLEngine
from processors.slot_constrained_rounds import ConstrainedRounds
from processors.slot_decoder import SlotDecoder
from processors.slot_intake import encode_works, prepare_work
from processors.slot_mixed import MixedStep
from processors.slot_phases import timed_phase
from processors.slot_records import (
    COUNTERS,
    STAGE,
    Completion,
    FinishReason,
    SlotEngineConfig,
    SlotWork,
)

log = logging.getLogger(__name__)


class SlotScheduler(ConstrainedRounds):
    """Admission, chunked prefill and decode rounds over a `SlotDecoder` (one thread).

    `add` tokenizes and validates a request (raises `ProcessingError(INVALID_REQUEST)`);
    `run_round` does up to `steps_per_round` decode steps, each after at most one prefill
    budget, and returns the requests that ended in it with their completions.
    """

    def __init__(self, engine: NativeInternVLEngine, config: SlotEngineConfig) -> None:
        base = engine.decoder
        if base is None or not engine.loaded:
            raise ProcessingError(
                ErrorCode.MODEL_NOT_LOADED,
                "the slot engine needs a loaded native engine on the static decode path",
                STAGE,
            )
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.eos_id = engine.im_end_id
        self.context_id = engine.context_id
        context = config.context_length or -(-(4096 + engine.config.max_new_tokens) // 128) * 128
        slots = config.slots or self._auto_slots(engine, base, context)
        # Constrained decoding: rows whose request carries an answer schema decode inside
        # its grammar, stepping one token (plus its forced run) at a time.
        self.constrained = bool(engine.config.constrained_decoding)
        self.follows_model = self.constrained and config.follow_model and config.forced_tokens > 0
        self.vocab_size = int(base.lm_head.out_features)
        self.grammars: GrammarCache | None = None
        self.constraint: ConstrainedRows | None = None
        self.decoder = SlotDecoder(
            base,
            slots=slots,
            context=context,
            steps_per_round=config.steps_per_round,
            cuda_graphs=engine.config.cuda_graphs,
            compile_step=engine.config.compile_decode and engine.device.startswith("cuda"),
            stage_rows=config.prefill_rows,
            # A group holds at most one budget of real tokens; padding can double it.
            prefill_graph_tokens=2 * config.prefill_tokens_per_step,
            max_width=config.forced_tokens + 1 if self.constrained else 1,
            vocab_size=self.vocab_size if self.constrained else 0,
            position_argmax=self.follows_model,
        )
        # Free rounds can carry a newcomer's prompt chunks in their decode steps.
        self.mixer: MixedStep | None = None
        self._round_mixes = False  # whether this round's steps may carry chunks
        if config.mixed_chunk_tokens:
            self.mixer = MixedStep(
                self.decoder,
                config.mixed_chunk_tokens,
                compile_layers=engine.config.compile_decode and engine.device.startswith("cuda"),
            )
        self._mixed_first: Any = None  # the mixed prompt's first token, before it activates
        self.waiting: deque[SlotWork] = deque()
        self.prefilling: SlotWork | None = None
        self.rows: list[SlotWork] = []  # row index -> request
        self.steps = 0  # decode steps so far
        self._wide_size = 0  # packed size of the last wide step
        self.stats = dict.fromkeys(COUNTERS, 0)  # for benchmarks, see COUNTERS
        # Host seconds per phase (profiling): vision, prefill (vision included), group (a
        # batched prefill), rounds (all of each round), free decode steps, leaving rows,
        # and in constrained rounds the chunk uploads and the token handling.
        self.phase_s = dict.fromkeys(
            ("vision", "prefill", "group", "rounds", "chunks", "tokens", "step", "leave"), 0.0
        )
        self.gpu_spans: list[tuple[str, Any, Any]] | None = None  # see `timed_phase`
        import torch

        with torch.inference_mode():
            self.decoder.capture_graphs()
            self.decoder.prefill.capture()
            if self.constrained:
                self.decoder.capture_wide()
            if self.mixer is not None:
                self.mixer.capture()
        for what, error in (
            ("the compiled decode layer", self.decoder.compile_error),
            ("the prefill graphs", self.decoder.prefill.capture_error),
            ("the mixed steps", self.mixer.capture_error if self.mixer else None),
        ):
            if error is not None:
                log.warning("slot engine: %s could not be captured, runs eagerly: %s", what, error)

    def _auto_slots(self, engine: NativeInternVLEngine, base: Any, context: int) -> int:
        if not engine.device.startswith("cuda"):
            return 16
        import torch

        free, _ = torch.cuda.mem_get_info(engine.device)
        per_slot = SlotDecoder.bytes_per_slot(base, context)
        return max(
            1, min(self.config.max_slots, int(free * self.config.memory_fraction) // per_slot)
        )

    @property
    def slots(self) -> int:
        """The decoder's rows: how many requests decode at once."""
        return self.decoder.slots

    @property
    def idle(self) -> bool:
        """Whether no request is decoding, waiting or being prefilled."""
        return not (self.rows or self.waiting or self.prefilling)

    def capacity(self) -> int:
        """How many more requests may be admitted now.

        One wait per free slot, and at most half of `staged_requests` waiting with their
        images still staged in pinned memory (the engine's preparation thread holds the
        other half ready).
        """
        busy = len(self.rows) + len(self.waiting) + (self.prefilling is not None)
        staged = sum(1 for work in self.waiting if work.staged is not None)
        return max(0, min(self.slots - busy, self.config.staged_requests // 2 - staged))

    def in_flight(self) -> list[SlotWork]:
        """Every request not finished yet: decoding, being prefilled, then waiting."""
        current = [self.prefilling] if self.prefilling is not None else []
        return [*self.rows, *current, *self.waiting]

    # --------------------------------------------------------------- admission

    def add(self, request: PreparedRequest, **limits: Any) -> SlotWork:
        """`prepare` (`limits`: its keyword arguments) then `admit`; raises as those do."""
        work = self.prepare(request, **limits)
        self.admit(work)
        return work

    def prepare(
        self,
        request: PreparedRequest,
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        submitted: float | None = None,
    ) -> SlotWork:
        """Tokenize a request and stage its images (`prepare_work`); thread-safe."""
        return prepare_work(
            self.engine,
            self.config,
            request,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            submitted=submitted,
        )

    def admit(self, work: SlotWork) -> None:
        """Queue a prepared request (scheduler thread): its answer grammar, its fit in a slot.

        Raises `ProcessingError(INVALID_REQUEST)` for a schema that does not compile or a
        prompt and answer that do not fit a slot; the request is then not queued.
        """
        request = work.request
        matcher, prefix = self._answer_matcher(request, work.max_new)
        if matcher is not None:
            work.min_new = 0  # a complete answer may only end
            work.ids = work.ids + prefix  # the answer's forced opening is prefilled with it
        margin = max(self.config.steps_per_round, self.decoder.max_width if matcher else 1)
        needed = len(work.ids) + work.max_new + margin
        if needed > self.decoder.context:
            raise ProcessingError(
                ErrorCode.INVALID_REQUEST,
                f"request {request.request_id}: {len(work.ids)} prompt tokens + "
                f"{work.max_new} new tokens do not fit a slot of {self.decoder.context} columns",
                STAGE,
            )
        work.matcher = matcher
        if prefix:
            reason = work.extend(prefix, self.eos_id, self._texts(prefix))
            work.fed = len(prefix)
            if reason is not None:  # not expected: a grammar's opening never completes it
                raise ProcessingError(
                    ErrorCode.INVALID_REQUEST,
                    f"request {request.request_id}: the answer grammar ends before any choice",
                    STAGE,
                )
        self.waiting.append(work)

    def _answer_matcher(self, request: PreparedRequest, max_new: int) -> tuple[Any, list[int]]:
        """(matcher, forced opening tokens) of a request decoded in its grammar, else (None, []).

        Raises `ProcessingError(INVALID_REQUEST)` for a schema that does not compile.
        """
        schema = request.answer_schema
        if not self.constrained or schema is None:
            return None, []
        if self.grammars is None:
            self.grammars = GrammarCache(
                self.tokenizer,
                vocab_size=self.vocab_size,
                stop_id=self.eos_id,
                threads=self.engine.config.grammar_threads,
            )
            self.constraint = ConstrainedRows(self.grammars, [None] * self.slots)
        try:
            matcher = self.grammars.matcher(schema)
        except ValueError as exc:
            raise ProcessingError(
                ErrorCode.INVALID_REQUEST, f"request {request.request_id}: {exc}", STAGE
            ) from exc
        if not self.config.forced_tokens or self.follows_model:
            # Every token is a step of its own, or the opening is checked against the
            # model like any forced run (`_follow_model`).
            return matcher, []
        return matcher, forced_tokens(matcher, max_new - 1)

    def _texts(self, ids: Sequence[int]) -> list[str]:
        """Token texts for the JSON-close watch (empty strings when it is off)."""
        if not self.config.stop_at_json_close:
            return [""] * len(ids)
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    @timed_phase("vision")
    def _vision(self, works: list[SlotWork]) -> list[tuple[SlotWork, ProcessingError]]:
        """Queue the vision work of `works` in one call (`encode_works`); the bad ones."""
        self.stats["vision"] += len(works)
        return encode_works(self.engine, works, self.context_id)

    def _take_next(
        self, pop: bool = True
    ) -> tuple[SlotWork | None, list[tuple[SlotWork, ProcessingError]]]:
        """The next waiting request, its vision done (with that of a few after it)."""
        failed: list[tuple[SlotWork, ProcessingError]] = []
        while self.waiting:
            work = self.waiting[0]
            if not work.vision_ready:
                failed.extend(self._encode_waiting(max(1, self.slots - len(self.rows))))
                continue
            return (self.waiting.popleft() if pop else work), failed
        return None, failed

    def _vision_ahead(self) -> list[tuple[SlotWork, ProcessingError]]:
        """Queue the vision of the waiting requests that have a free slot ahead of them.

        Called at the end of a round, after its ids' copy is queued and before the host
        waits for it. Only requests with a slot free now (before this round's leavers)
        go, so at full slots nothing is queued; returns the requests that failed.
        """
        free = self.slots - len(self.rows) - (self.prefilling is not None)
        return self._encode_waiting(max(0, free))

    def _encode_waiting(self, ahead: int) -> list[tuple[SlotWork, ProcessingError]]:
        """Queue the vision of the first `ahead` waiting requests not encoded yet.

        At most `vision_requests` of them go in one call; those that fail leave the
        queue and are returned.
        """
        group = [work for work in list(self.waiting)[:ahead] if not work.vision_ready]
        if not group:
            return []
        bad = self._vision(group[: self.config.vision_requests])
        for work, _ in bad:
            self.waiting.remove(work)
        return bad

    @timed_phase("prefill")
    def _prefill_step(self) -> list[tuple[SlotWork, ProcessingError]]:
        """Prefill up to the per-step budget; activate requests whose prompt is done.

        Whole prompts that fit the budget are prefilled together (up to the staging
        rows); a prompt longer than the budget goes in chunks, one chunk per step. With
        mixed steps on, while rows decode and few requests wait, the next one's prompt
        goes in chunks that the decode steps carry (`_step`), and it activates here
        after its last chunk.
        """
        failed: list[tuple[SlotWork, ProcessingError]] = []
        self._activate_mixed()
        budget = self.config.prefill_tokens_per_step
        while budget > 0:
            if self.prefilling is not None:
                if self._mixing():
                    break
                budget -= self._prefill_chunk(self.prefilling, budget)
                continue
            if self._start_mixing(failed):
                continue
            group: list[SlotWork] = []
            tokens = 0
            work: SlotWork | None = None
            while len(self.rows) + len(group) < self.slots and len(group) < self.decoder.stage_rows:
                work, bad = self._take_next(pop=False)
                failed.extend(bad)
                if work is None or tokens + len(work.ids) > budget:
                    break
                group.append(self.waiting.popleft())
                tokens += len(work.ids)
            # A group of 5 would run the 8-row prefill: give back what pads it (3 rows of
            # a ~3,300-token prompt is ~20 ms of an H200 computing padding).
            keep = self.decoder.prefill.unpadded_rows(len(group))
            for extra in reversed(group[keep:]):
                self.waiting.appendleft(extra)
                tokens -= len(extra.ids)
            del group[keep:]
            if not group:
                full_budget = self.config.prefill_tokens_per_step
                if work is None or len(self.rows) >= self.slots or len(work.ids) <= full_budget:
                    break  # nothing waits, no slot is free, or it fits the next step whole
                self.prefilling = self.waiting.popleft()  # longer than any budget: chunks
                continue
            self._prefill_group(group)
            budget -= tokens
        return failed

    @timed_phase("group")
    def _prefill_group(self, group: list[SlotWork]) -> None:
        import torch

        parts = [work.features for work in group if work.features is not None]
        features = torch.cat(parts) if parts else None
        first = self.decoder.prefill.prefill_rows(
            [work.ids for work in group],
            features,
            [work.min_new for work in group],
            logits_mask=self._first_token_mask(group),
        )
        self._activate(group, first)
        self.stats["prefill_tokens"] += sum(len(work.ids) for work in group)

    def _mixing(self) -> bool:
        """Whether the decode steps carry the chunks of the prompt being prefilled."""
        work = self.prefilling
        return (
            self.mixer is not None
            and self._round_mixes
            and work is not None
            and work.matcher is None
            and bool(self.rows)
            and self._mixed_first is None
            and self.mixer.fits(len(work.ids))
        )

    def _activate_mixed(self) -> None:
        """Activate the prompt whose last chunk the previous (mixed) step carried."""
        if self._mixed_first is not None and self.prefilling is not None:
            first, self._mixed_first = self._mixed_first, None
            self._activate([self.prefilling], first)
            self.prefilling = None

    def _start_mixing(self, failed: list[tuple[SlotWork, ProcessingError]]) -> bool:
        """Take the next waiting request into mixed steps, when they apply; whether it did."""
        few = len(self.waiting) <= self.config.mixed_max_waiting
        if not (self.mixer and self._round_mixes and self.rows and few):
            return False
        work, bad = self._take_next(pop=False)
        failed.extend(bad)
        full = len(self.rows) >= self.slots
        if work is None or work.matcher is not None or full or not self.mixer.fits(len(work.ids)):
            return False
        self.prefilling = self.waiting.popleft()
        return True

    def _next_chunk(self, work: SlotWork, size: int) -> tuple[list[int], Any]:
        """The next (at most `size`) prompt ids of `work` and their image features; moves on."""
        take = min(size, len(work.ids) - work.done)
        chunk = work.ids[work.done : work.done + take]
        images = chunk.count(self.context_id)
        features = None
        if images:
            features = work.features[work.images_done : work.images_done + images]
        work.done += take
        work.images_done += images
        self.stats["prefill_tokens"] += take
        return chunk, features

    def _prefill_chunk(self, work: SlotWork, budget: int) -> int:
        """The next chunk (at most `budget` tokens) of a long prompt; returns its size."""
        start = work.done
        chunk, features = self._next_chunk(work, budget)
        last = work.done == len(work.ids)
        input_ids = self.decoder.to_device([chunk], pad=self.eos_id)
        mask = self._first_token_mask([work]) if last else None
        first = self.decoder.prefill.prefill_chunk(
            input_ids, start, features, last, work.min_new, logits_mask=mask
        )
        if last:
            self._activate([work], first)
            self.prefilling = None
        return len(chunk)

    def _first_token_mask(self, group: list[SlotWork]) -> Any:
        """The mask of the first tokens of `group`, about to take rows n.. (None: all free)."""
        constraint = self.constraint
        if constraint is None or all(work.matcher is None for work in group):
            return None
        first_row = len(self.rows)
        rows = range(first_row, first_row + len(group))
        for row, work in zip(rows, group, strict=True):
            constraint.set_row(row, work.matcher)

        def mask(logits: Any) -> None:
            constraint.fill(rows)
            constraint.apply(logits, rows=slice(rows.start, rows.stop))

        return mask

    def _activate(self, group: list[SlotWork], first: Any) -> None:
        """Move the prefilled staging rows of `group` into rows n..; `first` is (len,)."""
        row = len(self.rows)
        self.decoder.activate_rows(
            row, [len(work.ids) for work in group], first, [work.min_new for work in group]
        )
        for stage, work in enumerate(group):
            if self.constraint is not None:
                self.constraint.set_row(row + stage, work.matcher)
            work.first = first[stage : stage + 1]
            work.unseen = True
            work.features = None
            work.activated_step = self.steps
            self.rows.append(work)

    # ----------------------------------------------------------------- rounds

    @timed_phase("rounds")
    def run_round(
        self, intake: Callable[[], object] | None = None
    ) -> tuple[list[tuple[SlotWork, Completion]], list[tuple[SlotWork, ProcessingError]]]:
        """Up to `steps_per_round` steps; returns (ended requests, failed requests).

        `intake` (the engine's admission of requests prepared meanwhile) is called at the
        end of a free round, after the copy of its ids is queued: the vision of what it
        admitted is then queued before the host waits for those ids.
        """
        import torch

        with torch.inference_mode():
            if self.constraint is not None and any(
                work.matcher is not None for work in self.in_flight()
            ):
                return self._constrained_round()
            return self._round(intake)

    def _round(
        self, intake: Callable[[], object] | None
    ) -> tuple[list[tuple[SlotWork, Completion]], list[tuple[SlotWork, ProcessingError]]]:
        decoder = self.decoder
        decoder.begin_round()
        self._round_mixes = self.mixer is not None
        first_step = self.steps
        failed: list[tuple[SlotWork, ProcessingError]] = []
        done = 0
        while done < self.config.steps_per_round:
            failed.extend(self._prefill_step())
            if not self.rows:
                if self.prefilling is None and not self.waiting:
                    break
                continue
            self._step()
            self.steps += 1
            done += 1
            self.stats["active_rows"] += len(self.rows)
            self.stats["padded_rows"] += decoder.batch_for(len(self.rows))
        if not self.rows:
            return [], failed
        self.stats["steps"] += done
        self.stats["rounds"] += 1
        count = len(self.rows)
        size = decoder.copy_round(
            count, done, [work.first for work in self.rows if work.first is not None]
        )
        # The GPU encodes the next newcomers' images while the host takes this round's ids.
        if intake is not None:
            intake()
        failed.extend(self._vision_ahead())
        host = decoder.round_ids(size)
        first_ids = iter(host[count * done :])
        texts_of = self.tokenizer.convert_ids_to_tokens if self.config.stop_at_json_close else None
        ended: list[tuple[int, SlotWork, FinishReason]] = []
        for row, work in enumerate(self.rows):
            new: list[int] = []
            if work.first is not None:
                new.append(next(first_ids))
                work.first = None
            begin = max(0, work.activated_step - first_step)
            new.extend(host[row * done + begin : (row + 1) * done])
            work.fed += done - begin
            work.unseen = False
            texts = texts_of(new) if texts_of is not None else [""] * len(new)
            reason = work.extend(new, self.eos_id, texts)
            if reason is not None:
                ended.append((row, work, reason))
        return self._leave(ended), failed

    @timed_phase("step")
    def _step(self) -> None:
        work = self.prefilling
        if work is None or self.mixer is None or not self._mixing():
            self.decoder.step(len(self.rows))
            return
        start = work.done
        chunk, features = self._next_chunk(work, self.mixer.chunk)
        self.mixer.load(chunk, start, features)
        self.mixer.step(len(self.rows))
        self.stats["mixed_steps"] += 1
        if work.done == len(work.ids):  # it activates before the next step
            self._mixed_first = self.mixer.first_token(work.min_new)

    @timed_phase("leave")
    def _leave(
        self, ended: list[tuple[int, SlotWork, FinishReason]]
    ) -> list[tuple[SlotWork, Completion]]:
        """Free the rows of ended requests (the last row moves into each); their completions."""
        if not ended:
            return []
        now = time.perf_counter()
        completions = []
        origin = list(range(len(self.rows)))  # row -> the row whose state it will hold
        for row, work, reason in sorted(ended, key=lambda item: -item[0]):
            last = len(self.rows) - 1
            if self.constraint is not None:
                self.constraint.move_row(last, row)
            self.rows[row] = self.rows[last]
            origin[row] = origin[last]
            self.rows.pop()
            origin.pop()
            completions.append((work, self._completion(work, reason, now)))
        # Each source is a row past the survivors, each target a row below: one copy.
        moves = [(source, target) for target, source in enumerate(origin) if source != target]
        columns = max((len(self.rows[t].ids) + self.rows[t].fed for _, t in moves), default=0)
        self.decoder.move_rows(moves, min(self.decoder.context, columns), len(self.rows))
        return completions[::-1]

    def _completion(self, work: SlotWork, reason: FinishReason, now: float) -> Completion:
        text = self.tokenizer.decode(work.tokens, skip_special_tokens=True)
        return Completion(
            work.request.request_id,
            work.request.attempt,
            text.split(IM_END_TOKEN)[0].strip(),
            tuple(work.tokens),
            reason,
            queued_s=work.started - work.submitted,
            total_s=now - work.submitted,
        )

    def abort(self) -> list[SlotWork]:
        """Drop every request in flight (after a model failure); returns them."""
        dropped = self.in_flight()
        for row in range(len(self.rows)):
            self.decoder.release(row)
            if self.constraint is not None:
                self.constraint.move_row(row, row)
        self.rows.clear()
        self.waiting.clear()
        self.prefilling = None
        self._mixed_first = None
        return dropped
