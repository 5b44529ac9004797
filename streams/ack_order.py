"""In-order acknowledgement of a partition's inputs.

An input is released only when every earlier input of its partition is done.

With the slot engine, requests of one partition finish out of order (a short answer
overtakes a long one). Acknowledging each input as soon as its own outputs are stored
would let the committed offset pass an input still in flight: Kafka commits one offset
per partition, meaning "everything below is done". faust's own bookkeeping does not
guard this everywhere (it skips its head-of-queue gap check while the committed offset
is 0 or unknown), so the worker never hands an acknowledgement to faust before every
lower offset of the same partition is done.

`AckOrder` is pure bookkeeping, not thread-safe (one event loop drives it):
`track(partition, offset, item)` registers an input and returns its ticket;
`complete(ticket)` marks it done and returns the items that may now be acknowledged, in
offset order: the done inputs below the lowest offset still pending in that partition.
The same offset may be tracked twice (a redelivery after a rebalance); each copy must
complete.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ticket:
    """One tracked input: its partition, offset and a sequence number unique per tracker."""

    partition: Hashable
    offset: int
    sequence: int


@dataclass(slots=True)
class _Partition(Generic[T]):
    order: list[tuple[int, int]] = field(default_factory=list)  # (offset, sequence), sorted
    items: dict[int, T] = field(default_factory=dict)  # sequence -> item
    done: set[int] = field(default_factory=set)  # sequences completed, not yet released


class AckOrder(Generic[T]):
    """Releases completed inputs of each partition in offset order, never past a pending one."""

    def __init__(self) -> None:
        self._partitions: dict[Hashable, _Partition[T]] = {}
        self._sequence = itertools.count()

    def track(self, partition: Hashable, offset: int, item: T) -> Ticket:
        """Register an input (pending until `complete`); returns its ticket."""
        state = self._partitions.setdefault(partition, _Partition())
        sequence = next(self._sequence)
        bisect.insort(state.order, (offset, sequence))
        state.items[sequence] = item
        return Ticket(partition, offset, sequence)

    def complete(self, ticket: Ticket) -> list[T]:
        """Mark `ticket` done; returns the items now safe to acknowledge, lowest offset first.

        Raises KeyError for a ticket that is not pending (unknown, or completed already).
        """
        state = self._partitions.get(ticket.partition)
        if state is None or ticket.sequence not in state.items or ticket.sequence in state.done:
            raise KeyError(f"ticket {ticket} is not pending")
        state.done.add(ticket.sequence)
        released = 0
        for _, sequence in state.order:
            if sequence not in state.done:
                break
            released += 1
        out = []
        for _, sequence in state.order[:released]:
            state.done.discard(sequence)
            out.append(state.items.pop(sequence))
        del state.order[:released]
        if not state.order:
            del self._partitions[ticket.partition]
        return out

    def pending(self, partition: Hashable | None = None) -> int:
        """Inputs tracked and not yet released (of one partition, or of all)."""
        if partition is not None:
            state = self._partitions.get(partition)
            return len(state.order) if state else 0
        return sum(len(state.order) for state in self._partitions.values())

    def lowest_pending(self, partition: Hashable) -> int | None:
        """The lowest offset of `partition` not yet released (None: nothing tracked)."""
        state = self._partitions.get(partition)
        return state.order[0][0] if state else None
