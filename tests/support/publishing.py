"""`Publisher` doubles: one records what a handler sends, one fails sends as scripted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class RecordingPublisher:
    """Keeps (topic, key, value bytes) of every send, in the order sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        self.sent.append((topic, key, value))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def topics(self) -> list[str]:
        return [topic for topic, _, _ in self.sent]


class ScriptedPublisher(RecordingPublisher):
    """Like `RecordingPublisher`, but a send fails as `fail(topic, value, attempt)` says.

    `fail` returns None (acknowledged), or an exception for the delivery future; with
    `raise_now` the exception is raised by `send` itself (refused before it left).
    """

    def __init__(
        self,
        fail: Callable[[str, bytes, int], BaseException | None],
        *,
        raise_now: bool = False,
    ) -> None:
        super().__init__()
        self._fail = fail
        self._raise_now = raise_now
        self.attempts: dict[tuple[str, bytes], int] = {}

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        attempt = self.attempts[(topic, value)] = self.attempts.get((topic, value), 0) + 1
        error = self._fail(topic, value, attempt)
        if error is None:
            return await super().send(topic, key, value)
        if self._raise_now:
            raise error
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_exception(error)
        return done
