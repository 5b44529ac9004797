"""The pickup agent on the slot engine: one task per input, acknowledgements in offset order.

`StreamingVerifier.dispatch(events, messages)` takes what the agent fetched (faust's
`noack_take`, so nothing is acknowledged automatically) and starts one task per input:
decode, gather and tile its images, submit it to the engine (a retry after an invalid
answer is a new submission), publish its decision (or dead letter) as soon as its answer
is done, and wait until the broker acknowledged every output. Only then is the input
marked done in an `AckOrder`, which hands faust the acknowledgements in offset order:
a partition's committed offset never passes an input whose outputs are not stored, even
when later inputs finish first.

Backpressure: `dispatch` returns (and the agent fetches again) only while the engine's
queue has room and fewer than `max_in_flight` inputs are in flight; until then the agent
takes nothing, faust's stream buffer fills and it stops fetching.

Failures: per-input problems become dead letters inside the handler. If handling or
publishing an input raises anyway, that input runs again after a capped backoff with a
new writer; it is never acknowledged meanwhile, and neither is anything after it in its
partition. `drain(timeout)` (at shutdown) waits for the inputs in flight, then cancels
the rest unacknowledged: they are redelivered after the restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from streams.ack_order import AckOrder, Ticket
from streams.handlers import BatchHandler, RawMessage
from streams.metrics import Metrics
from streams.publishing import EventWriter

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0
ROOM_POLL_S = 0.01  # how often a full engine queue is looked at again


class Ackable(Protocol):
    """What the verifier needs of a faust event: its acknowledgement."""

    def ack(self) -> Any:
        """Acknowledge the event to faust (its offset may then be committed)."""
        ...


class StreamingVerifier:
    """Runs each input on its own, acknowledges in offset order per partition."""

    agent = "verify-pickups"

    def __init__(
        self,
        handler: BatchHandler,
        new_writer: Callable[[], EventWriter],
        metrics: Metrics,
        *,
        has_room: Callable[[], bool],
        max_in_flight: int,
        on_done: Callable[[], None] | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        """Wire the verifier; raises `ValueError` when `max_in_flight` < 1.

        `has_room`: whether the engine takes a submission now; `on_done`: called after
        each input is acknowledged (engine metrics).
        """
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._handler = handler
        self._new_writer = new_writer
        self._metrics = metrics
        self._has_room = has_room
        self._max_in_flight = max_in_flight
        self._on_done = on_done
        self._sleep = sleep
        self._acks: AckOrder[Ackable] = AckOrder()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def in_flight(self) -> int:
        """Inputs started and not yet acknowledged."""
        return len(self._tasks)

    async def dispatch(self, events: Sequence[Ackable], messages: Sequence[RawMessage]) -> None:
        """Start one task per input; return once there is room for more (backpressure).

        After `drain` began, nothing new is started: those inputs stay unacknowledged.
        """
        if self._closing:
            return
        self._metrics.observe_batch(self.agent, len(messages))
        for event, message in zip(events, messages, strict=True):
            self._metrics.count_in(message.topic)
            ticket = self._acks.track((message.topic, message.partition), message.offset, event)
            task = asyncio.create_task(self._run(message, ticket))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await self.wait_for_room()

    async def wait_for_room(self) -> None:
        """Return once the engine takes submissions and fewer than `max_in_flight` run."""
        while not self._closing and (
            len(self._tasks) >= self._max_in_flight or not self._has_room()
        ):
            await self._sleep(ROOM_POLL_S)

    async def _run(self, message: RawMessage, ticket: Ticket) -> None:
        delay = 0.5
        while True:
            writer = self._new_writer()
            try:
                await self._handler.handle([message], writer)
                with self._metrics.time_phase("publish"):
                    await writer.flush()
                break
            except Exception:
                log.exception(
                    "%s: %s@%d:%d raised; running it again in %.1fs, nothing acknowledged",
                    self.agent,
                    message.topic,
                    message.partition,
                    message.offset,
                    delay,
                )
                await self._sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        for topic, sent in writer.sent.items():
            self._metrics.count_out(topic, sent)
        for event in self._acks.complete(ticket):
            event.ack()
        if self._on_done is not None:
            self._on_done()

    async def drain(self, timeout: float) -> None:
        """Stop starting inputs, wait up to `timeout` s for those in flight, cancel the rest.

        Cancelled inputs are not acknowledged (nor anything after them in their partition).
        """
        self._closing = True
        tasks = list(self._tasks)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        if late:
            log.warning("%d inputs still in flight at shutdown; left unacknowledged", len(late))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
