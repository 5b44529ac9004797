"""`run_isolated` (the one retry layer) and `timed` (a phase measured once)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from processors.batching import run_isolated, timed


class Doubler:
    """Doubles numbers; raises for a batch holding a number in `bad`, or miscounts."""

    def __init__(self, bad: frozenset[int] = frozenset(), *, drop_one: bool = False) -> None:
        self.bad = bad
        self.drop_one = drop_one
        self.calls: list[list[int]] = []

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.calls.append(list(items))
        if self.bad & set(items):
            raise ValueError(f"bad input in {list(items)}")
        doubled = [2 * n for n in items]
        return doubled[:-1] if self.drop_one and len(items) > 1 else doubled


def failed(item: int, exc: Exception) -> int:
    return -item


async def test_a_batch_that_succeeds_runs_once() -> None:
    run = Doubler()
    assert await run_isolated(run, [1, 2, 3], failed) == [2, 4, 6]
    assert run.calls == [[1, 2, 3]]


async def test_a_raising_batch_runs_item_by_item_and_only_the_bad_item_fails() -> None:
    run = Doubler(bad=frozenset({2}))
    told: list[Exception] = []
    results = await run_isolated(run, [1, 2, 3], failed, on_batch_error=told.append)
    assert results == [2, -2, 6]
    assert run.calls == [[1, 2, 3], [1], [2], [3]]
    assert [str(e) for e in told] == ["bad input in [1, 2, 3]"]


async def test_a_wrong_number_of_results_counts_as_a_failed_batch() -> None:
    run = Doubler(drop_one=True)
    told: list[Exception] = []
    assert await run_isolated(run, [1, 2], failed, on_batch_error=told.append) == [2, 4]
    assert run.calls == [[1, 2], [1], [2]]
    assert "a batch of 2 gave 1 results" in str(told[0])


async def test_a_batch_of_one_is_not_run_twice() -> None:
    run = Doubler(bad=frozenset({5}))
    told: list[Exception] = []
    assert await run_isolated(run, [5], failed, on_batch_error=told.append) == [-5]
    assert run.calls == [[5]] and told == []


async def test_an_empty_batch_gives_nothing() -> None:
    assert await run_isolated(Doubler(), [], failed) == []


def test_timed_reports_the_block_also_when_it_raises() -> None:
    clock = iter([10.0, 10.25, 20.0, 21.0])
    seen: list[tuple[str, float]] = []

    def observe(phase: str, seconds: float) -> None:
        seen.append((phase, seconds))

    with timed(observe, "tile", lambda: next(clock)):
        pass
    with pytest.raises(RuntimeError), timed(observe, "decide", lambda: next(clock)):
        raise RuntimeError("boom")
    assert seen == [("tile", 0.25), ("decide", 1.0)]


def test_timed_without_an_observer_measures_nothing() -> None:
    def no_clock() -> float:
        raise AssertionError("the clock must not be read")

    with timed(None, "tile", no_clock):
        pass
