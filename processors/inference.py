"""The inference phase: one small interface over every engine.

An engine takes a batch of prepared requests (prompt text plus the tiles of every
image) and returns one raw text per request, in order. Engines load their weights
in an explicit `load()` step, never in `__init__` or at import time.

Prompt convention (the InternVL chat convention): the prompt holds one `<image>`
placeholder per image, in the order of `num_patches`; the engine expands each into
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>` and applies the
model's chat template.

Engines:
- `ReplayEngine` (here): returns recorded raw outputs; for re-deciding past requests
  after a rule change, for the demo and for deterministic tests.
- the InternVL engines (`processors.internvl`): Hugging Face native and the original
  remote-code checkpoint format.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from processors.errors import ErrorCode, ProcessingError

if TYPE_CHECKING:
    from processors.answer_schema import AnswerSchema

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """What the model needs for one request and attempt.

    `pixel_values` is a float tensor of shape (sum(num_patches), 3, 448, 448), or
    None for engines that do not look at images (replay). `answer_schema`, the request's
    own answer schema, lets an engine that can constrain its decoding keep the answer
    inside it (`processors.constrained`); other engines ignore it.
    """

    request_id: str
    attempt: int
    prompt: str
    num_patches: tuple[int, ...]
    pixel_values: Any = None
    answer_schema: AnswerSchema | None = None


@runtime_checkable
class InferenceEngine(Protocol):
    """Batch in, raw texts out; `generate` is synchronous and runs off the event loop."""

    @property
    def model_version(self) -> str:
        """The version recorded with every result this engine produced."""
        ...

    def load(self) -> None:
        """Load weights; raises `ProcessingError(MODEL_NOT_LOADED)` with the reason on failure."""

    def generate(self, batch: Sequence[PreparedRequest]) -> list[str]:
        """One raw text per request, same order; raises on a failure of the whole batch."""


class ReplayEngine:
    """Returns recorded raw outputs instead of running a model.

    `outputs[request_id][attempt - 1]` is the text returned for that attempt. A request
    or attempt with no recording raises `ProcessingError(MODEL_FAILED)`: replay never
    invents an answer.
    """

    def __init__(
        self,
        outputs: Mapping[str, Sequence[str]],
        version: str = "replay",
        *,
        latency_s: float = 0.0,
    ) -> None:
        # latency_s simulates a model's time per batch call (capacity rehearsals, crash tests).
        self._outputs = {key: tuple(value) for key, value in outputs.items()}
        self._version = version
        self._latency_s = latency_s

    @property
    def model_version(self) -> str:
        """The version given at construction ("replay" by default)."""
        return self._version

    def load(self) -> None:
        """Nothing to load: the outputs were given at construction."""
        return None

    def generate(self, batch: Sequence[PreparedRequest]) -> list[str]:
        """The recorded text of each request's attempt, in order.

        Raises:
            ProcessingError: `MODEL_FAILED` when a request or attempt has no recording.
        """
        if self._latency_s > 0:
            time.sleep(self._latency_s)
        results: list[str] = []
        for request in batch:
            recorded = self._outputs.get(request.request_id, ())
            if not 1 <= request.attempt <= len(recorded):
                raise ProcessingError(
                    ErrorCode.MODEL_FAILED,
                    f"no recorded output for request {request.request_id} attempt {request.attempt}",
                    "model",
                )
            results.append(recorded[request.attempt - 1])
        return results
