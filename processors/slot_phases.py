"""Timing of the slot scheduler's phases, for profiling (`bench/profile_slot.py`).

`timed_phase(name)` decorates a method of an object with `phase_s` (a dict of host
seconds per phase name) and `gpu_spans` (None, or a list that collects CUDA events).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

Method = TypeVar("Method", bound=Callable[..., Any])


class Phased(Protocol):
    """What a timed method's object holds."""

    phase_s: dict[str, float]
    gpu_spans: list[tuple[str, Any, Any]] | None


def timed_phase(name: str) -> Callable[[Method], Method]:
    """Add the host seconds of each call of the method to `self.phase_s[name]`.

    With `self.gpu_spans` set to a list (profiling, CUDA only), each call also appends
    (name, start event, end event) recorded on the current stream around the work it
    queued. The method's result and exceptions pass through unchanged.
    """

    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def timed(self: Phased, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            spans = self.gpu_spans
            start = timing_event() if spans is not None else None
            try:
                return method(self, *args, **kwargs)
            finally:
                self.phase_s[name] += time.perf_counter() - began
                if spans is not None:
                    spans.append((name, start, timing_event()))

        return cast(Method, timed)

    return decorate


def timing_event() -> Any:
    """A recorded CUDA event with timing on (profiling only)."""
    import torch

    constructor: Any = torch.cuda.Event
    event = constructor(enable_timing=True)
    event.record()
    return event
