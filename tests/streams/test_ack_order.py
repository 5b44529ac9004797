"""AckOrder: out-of-order completions never release an input past a pending offset."""

from __future__ import annotations

import random

import pytest

from streams.ack_order import AckOrder


def test_a_later_input_that_finishes_first_waits_for_the_earlier_one() -> None:
    acks: AckOrder[str] = AckOrder()
    first, second, third = (acks.track(("t", 0), n, f"m{n}") for n in (10, 11, 12))
    assert acks.complete(third) == []
    assert acks.complete(second) == []
    assert acks.lowest_pending(("t", 0)) == 10
    assert acks.complete(first) == ["m10", "m11", "m12"]
    assert acks.pending() == 0 and acks.lowest_pending(("t", 0)) is None


def test_partitions_are_independent() -> None:
    acks: AckOrder[str] = AckOrder()
    slow = acks.track(("t", 0), 5, "p0-5")
    fast = acks.track(("t", 1), 7, "p1-7")
    assert acks.complete(fast) == ["p1-7"]  # partition 1 does not wait for partition 0
    assert acks.pending(("t", 0)) == 1 and acks.pending(("t", 1)) == 0
    assert acks.complete(slow) == ["p0-5"]


def test_an_input_tracked_after_a_later_offset_still_holds_it_back() -> None:
    acks: AckOrder[int] = AckOrder()
    late = acks.track("p", 20, 20)
    early = acks.track("p", 3, 3)  # e.g. redelivered after a rebalance
    assert acks.complete(late) == []
    assert acks.complete(early) == [3, 20]


def test_the_same_offset_tracked_twice_needs_both_copies_done() -> None:
    acks: AckOrder[str] = AckOrder()
    one = acks.track("p", 4, "a")
    two = acks.track("p", 4, "b")
    after = acks.track("p", 5, "c")
    assert acks.complete(two) == []
    assert acks.complete(after) == []
    assert acks.complete(one) == ["a", "b", "c"]


def test_completing_twice_or_an_unknown_ticket_raises() -> None:
    acks: AckOrder[str] = AckOrder()
    first = acks.track("p", 0, "a")
    second = acks.track("p", 1, "b")
    acks.complete(second)
    with pytest.raises(KeyError):
        acks.complete(second)
    acks.complete(first)
    with pytest.raises(KeyError):
        acks.complete(first)


@pytest.mark.parametrize("seed", range(20))
def test_random_completion_orders_release_each_input_once_below_every_pending_offset(
    seed: int,
) -> None:
    rng = random.Random(seed)
    acks: AckOrder[tuple[int, int]] = AckOrder()
    tickets = [
        acks.track(partition, offset, (partition, offset))
        for offset in range(40)
        for partition in range(3)
    ]
    rng.shuffle(tickets)
    pending = {(t.partition, t.offset) for t in tickets}
    released: list[tuple[int, int]] = []
    for ticket in tickets:
        out = acks.complete(ticket)
        pending.discard((ticket.partition, ticket.offset))
        for partition, offset in out:
            # The committed offset would move to offset + 1: nothing below may be pending.
            assert all(o > offset for p, o in pending if p == partition), (out, ticket)
        assert out == sorted(out)
        released.extend(out)
    assert sorted(released) == sorted((t.partition, t.offset) for t in tickets)
    assert acks.pending() == 0
