"""Publishing outputs: encode, send, and wait for the broker's acknowledgement.

Handlers never touch faust directly: they get a `Publisher`, so their logic can be
tested with the `RecordingPublisher` double in `tests/`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from streams.codecs import Codecs, until_registry_answers
from streams.settings import Topics


class Publisher(Protocol):
    """Sends one encoded record; the returned awaitable resolves when the broker acked it."""

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]: ...


class EventWriter:
    """Encodes records with the topic's codec and collects delivery futures.

    `flush()` waits for every pending delivery; it raises if any send failed, in
    which case the caller must not acknowledge its inputs (they will be redelivered).
    """

    def __init__(self, publisher: Publisher, codecs: Codecs, topics: Topics) -> None:
        self._publisher = publisher
        self._codecs = codecs
        self._topics = topics
        self._pending: list[Awaitable[Any]] = []
        self.sent: dict[str, int] = {}

    async def write(self, topic: str, key: str | bytes | None, record: Mapping[str, Any]) -> None:
        codec = self._codecs.for_schema(self._topics.schema_of(topic))
        encoded_key = key.encode("utf-8") if isinstance(key, str) else key
        # A registry outage while registering an output schema holds the batch, drops nothing.
        encode = functools.partial(codec.encode, record)
        value = await until_registry_answers(encode, f"encoding for {topic}")
        delivery = await self._publisher.send(topic, encoded_key, value)
        self._pending.append(delivery)
        self.sent[topic] = self.sent.get(topic, 0) + 1

    async def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)
