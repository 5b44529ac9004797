"""A `Publisher` double that records what a handler sends, in order, acknowledged at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
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
