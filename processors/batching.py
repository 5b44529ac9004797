"""What every micro-batch pipeline shares: isolating a failure, and timing a phase once.

`run_isolated` is the project's one retry layer: a batch is run as one call; if that
call raises (or returns the wrong number of results), each item runs again on its own,
so one bad input cannot sink its batch, and an item that still raises alone becomes the
caller's failure value. The verification pipeline uses it for engine calls, the stream
handlers for a whole pipeline run.

`PhaseObserver` is how a pipeline reports the wall time of a phase of one batch (the
worker passes `streams.metrics.Metrics.observe_phase`); `timed` measures a block with it.
Nothing here knows about Kafka, metrics libraries or models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

PhaseObserver = Callable[[str, float], None]
"""`observe(phase, seconds)`: one phase of one batch took `seconds` of wall time."""


async def run_isolated(
    run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
    items: Sequence[T],
    on_error: Callable[[T, Exception], R],
    *,
    on_batch_error: Callable[[Exception], None] | None = None,
) -> list[R]:
    """`run(items)`, or else `run([item])` for each item; one result per item, in order.

    When the batch call raises an `Exception` or returns a different number of results,
    `on_batch_error(exc)` is told (for logging or accounting) and every item runs alone;
    an item whose own call fails yields `on_error(item, exc)`. A batch of one is not run
    twice. Never raises an `Exception` of `run` (only what `on_error` or
    `on_batch_error` raise); `BaseException`s such as cancellation propagate.
    """
    try:
        return _checked(await run(items), len(items))
    except Exception as exc:
        log.debug("a batch of %d raised", len(items), exc_info=True)
        if len(items) == 1:
            return [on_error(items[0], exc)]
        if on_batch_error is not None:
            on_batch_error(exc)
    results: list[R] = []
    for item in items:
        try:
            results.extend(_checked(await run([item]), 1))
        except Exception as exc:
            log.debug("an item run alone raised", exc_info=True)
            results.append(on_error(item, exc))
    return results


def _checked(results: Sequence[R], expected: int) -> list[R]:
    if len(results) != expected:
        raise RuntimeError(f"a batch of {expected} gave {len(results)} results")
    return list(results)


@contextmanager
def timed(
    observe: PhaseObserver | None, phase: str, timer: Callable[[], float] = time.perf_counter
) -> Iterator[None]:
    """Report the wall time of the `with` block as `phase`, also when it raises.

    With `observe=None` nothing is measured. What `observe` raises propagates (an unknown
    phase is a programming error).
    """
    if observe is None:
        yield
        return
    started = timer()
    try:
        yield
    finally:
        observe(phase, timer() - started)
