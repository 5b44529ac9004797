"""The slot engine's settings and records: its configuration, a completion, a request's state.

See `processors.slot_engine` for the engine. `SlotWork` is the scheduler's mutable state of
one request; the others are frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from processors.inference import PreparedRequest

STAGE = "model"

COUNTERS = (
    "steps",  # decode steps (mixed ones included)
    "active_rows",  # rows decoded over all steps, then with the ladder's padding
    "padded_rows",
    "prefill_tokens",  # prompt tokens prefilled
    "vision",  # requests through the vision tower
    "rounds",
    "forced_tokens",  # constrained: tokens written by forced runs
    "constrained_steps",
    "packed_tokens",  # constrained: tokens of wide passes, padding included
    "forced_taken_back",  # forced tokens taken back for the model's own choice
    "mixed_steps",  # decode steps that carried a prompt chunk
)
"""The scheduler's counters (`SlotScheduler.stats`), for benchmarks."""
FinishReason = Literal["eos", "json", "length"]


@dataclass(frozen=True, slots=True)
class SlotEngineConfig:
    """Sizes and policy of the slot engine.

    Attributes:
        slots: rows of the KV cache decoded together; 0 sizes them from free GPU memory
            (`memory_fraction` of it) on CUDA, 16 on CPU.
        context_length: columns per slot (prompt + answer + one round of overshoot);
            0: 4096 + the engine's max_new_tokens, rounded up to 128.
        prefill_tokens_per_step: prompt tokens prefilled between two decode steps (whole
            prompts batched; a longer prompt is prefilled in chunks of this size). On
            CUDA, groups of up to twice this many padded tokens replay graphs captured
            at start (`processors.slot_prefill`). 32,768 is about ten prompts of 7 tiles:
            a backlog fills free slots in few, fuller steps (on an H200 each such step
            holds decoding for about 0.2 s); with arrivals spread out it rarely binds.
        steps_per_round: decode steps between two copies of the new ids to the host.
            A round ends with the host taking its ids and admitting newcomers; a leaver's
            slot is free up to `steps_per_round - 1` steps late. 32 measured a lower p95
            at 30 arrivals/s but more steps at saturation (`bench/README.md`).
        queue_size: submissions waiting for the scheduler before `submit` blocks.
        stop_at_json_close: a request also ends when its first JSON object closes.
        memory_fraction: share of free GPU memory the slots may take when `slots` is 0.
        max_slots: upper bound of the automatic slot count. 1,024 rows of 4,352 columns
            hold 55 GB of bfloat16 keys and values (InternVL2.5-1B); at saturation on an
            H200 they took 464 decode steps for 1,024 answers against 720 with 512 slots
            (`bench/README.md`).
        prefill_rows: whole prompts prefilled together in one call (staging rows).
        vision_requests: waiting requests whose images go through the vision tower in one
            call (each of them has a free slot ahead of it).
        staged_requests: requests whose tiles may wait in pinned host memory, prepared
            ahead of the vision tower (half in the engine's hand-over queue, half admitted
            and waiting); bounds that memory (7 tiles in bfloat16 are 8.4 MB, which the
            pinned allocator rounds up to 16 MB: 4 GB at 256) and how many requests a
            round admits (half of it). At least 2.
        forced_tokens: with constrained decoding, at most this many tokens the grammar
            forces after a row's chosen token are written in the same forward pass (a
            forced run); 0 steps through them one by one like free tokens.
        follow_model: with forced runs, also take the model's own greedy choice at every
            forced position (the logits of every packed token); where it differs from
            the forced token and the grammar allows it, the model's token replaces the
            rest of the run, so the answer follows the model's own split of the forced
            text. The answer's forced opening is then not prefilled either.
        mixed_chunk_tokens: 0, or the prompt tokens a decode step carries
            (`processors.slot_mixed`): while rows decode and at most `mixed_max_waiting`
            requests wait, the next prompt goes in chunks of this size, one per step,
            instead of a prefill pass that holds every row's decoding. Free rounds and
            requests without an answer schema only; a prompt must leave this many
            columns of its slot free.
        mixed_max_waiting: with more requests waiting, whole prompts are prefilled in
            groups as without mixed steps (fewer, fuller passes under a backlog).
    """

    slots: int = 0
    context_length: int = 0
    prefill_tokens_per_step: int = 32768
    steps_per_round: int = 16
    queue_size: int = 256
    stop_at_json_close: bool = True
    memory_fraction: float = 0.5
    max_slots: int = 1024
    vision_requests: int = 8
    staged_requests: int = 256
    prefill_rows: int = 8
    forced_tokens: int = 16
    follow_model: bool = False
    mixed_chunk_tokens: int = 0
    mixed_max_waiting: int = 4

    def __post_init__(self) -> None:
        for name in (
            "slots",
            "context_length",
            "forced_tokens",
            "mixed_chunk_tokens",
            "mixed_max_waiting",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "prefill_tokens_per_step",
            "steps_per_round",
            "queue_size",
            "max_slots",
            "vision_requests",
            "prefill_rows",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.staged_requests < 2:
            raise ValueError(f"staged_requests must be >= 2, got {self.staged_requests}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


@dataclass(frozen=True, slots=True)
class Completion:
    """The answer of one request: decoded text, its new token ids and why it ended.

    `queued_s` is the time from `submit` until a slot started on it (vision and prefill);
    `total_s` the time from `submit` until the answer was done.
    """

    request_id: str
    attempt: int
    text: str
    token_ids: tuple[int, ...]
    finish: FinishReason
    queued_s: float = 0.0
    total_s: float = 0.0


class JsonObjectEnd:
    """Watches generated text; `feed` returns True once the first JSON object closes.

    Counts braces outside double-quoted strings (escapes honoured) from the first `{`.
    `state` and `restore` save and put back where it is (a forced run taken back).
    """

    __slots__ = ("depth", "escape", "in_string")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False

    def state(self) -> tuple[int, bool, bool]:
        """Where the watch is: (depth, in a string, after a backslash)."""
        return self.depth, self.in_string, self.escape

    def restore(self, state: tuple[int, bool, bool]) -> None:
        """Go back to a `state()`."""
        self.depth, self.in_string, self.escape = state

    def feed(self, text: str) -> bool:
        """Watch more generated text; True once the first JSON object has closed."""
        for char in text:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif char == "\\":
                    self.escape = True
                elif char == '"':
                    self.in_string = False
            elif char == '"' and self.depth:
                self.in_string = True
            elif char == "{":
                self.depth += 1
            elif char == "}" and self.depth:
                self.depth -= 1
                if not self.depth:
                    return True
        return False


@dataclass(eq=False)
class SlotWork:
    """Host-side state of one request in the scheduler (mutable: the scheduler updates it)."""

    request: PreparedRequest
    ids: list[int]
    max_new: int
    min_new: int
    submitted: float
    json: JsonObjectEnd | None
    future: Future[Completion] | None = None
    features: Any = None  # (image tokens, hidden) on the device, during prefill
    done: int = 0  # prompt tokens prefilled
    images_done: int = 0  # image tokens prefilled
    activated_step: int = 0
    first: Any = None  # the first token (device), until the next copy to the host
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0
    vision_ready: bool = False
    matcher: Any = None  # the answer grammar's matcher (constrained decoding), else None
    staged: Any = None  # `StagedImages` until the vision tower took them
    forced: list[int] = field(default_factory=list)  # forced tokens not yet fed
    chunk: list[int] = field(default_factory=list)  # what the row fed in the last wide step
    json_before_forced: tuple[int, bool, bool] | None = None  # the watch before `forced`
    fed: int = 0  # generated tokens whose keys and values are in the row's columns
    unseen: bool = False  # the row's latest token is on the device only

    def extend(self, new: Sequence[int], eos: int, texts: Sequence[str]) -> FinishReason | None:
        """Append new ids up to the first stop; returns why the request ended, if it did."""
        for token, text in zip(new, texts, strict=True):
            if token == eos:
                return "eos"
            self.tokens.append(token)
            if len(self.tokens) >= self.max_new:
                return "length"
            if self.json is not None and self.json.feed(text) and len(self.tokens) >= self.min_new:
                return "json"
        return None
