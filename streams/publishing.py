"""Publishing outputs: encode, send, and wait for the broker's acknowledgement.

Handlers never touch faust directly: they get a `Publisher`, so their logic can be
tested with the `RecordingPublisher` double in `tests/`.

A publishing failure never loses an input. Transient errors (timeouts, connections,
leader changes: anything not known to be permanent) are retried with capped backoff;
`flush()` does not return until every output is acknowledged, so the caller
acknowledges nothing meanwhile. Permanent rejections of one output (larger than the
broker accepts, or a record its schema cannot encode) are replaced by a dead letter
for the input that always fits: the input's first `DEAD_LETTER_ORIGINAL_CAP` bytes,
its full length and SHA-256, and its source topic/partition/offset, where the broker
keeps the complete original for its retention.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiokafka import errors as kafka_errors

from processors.errors import ErrorCode
from processors.records import DeadLetter, SourcePosition
from streams.codecs import Codecs, now_ms, until_registry_answers
from streams.settings import Topics

log = logging.getLogger(__name__)

DEAD_LETTER_ORIGINAL_CAP: Final = 64 * 1024
"""Bytes of the original input a replacement dead letter keeps (the rest stays at its source)."""
_TEXT_CAP: Final = 2_000

# Errors no retry can cure: the record itself is refused.
_TOO_LARGE: Final = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
)
_REFUSED: Final = (
    *_TOO_LARGE,
    kafka_errors.CorruptRecordException,
    kafka_errors.UnsupportedForMessageFormatError,
)


class Publisher(Protocol):
    """Sends one encoded record; the returned awaitable resolves when the broker acked it."""

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Awaitable[Any]:
        """Queue the record; raises when the producer refuses it before it leaves."""
        ...


class Origin(Protocol):
    """The input an output answers (`streams.handlers.RawMessage` is one)."""

    @property
    def topic(self) -> str:
        """The input's topic."""
        ...

    @property
    def partition(self) -> int:
        """The input's partition."""
        ...

    @property
    def offset(self) -> int:
        """The input's offset in its partition."""
        ...

    @property
    def key(self) -> bytes | None:
        """The input's key as received."""
        ...

    @property
    def value(self) -> bytes | None:
        """The input's value as received (kept, capped, in a replacement dead letter)."""
        ...


class _Unencodable(Exception):
    """The record does not fit its topic's schema."""


def is_permanent(exc: BaseException) -> bool:
    """Whether no retry can publish this record (too large, corrupt, not encodable)."""
    return isinstance(exc, (*_REFUSED, _Unencodable))


def replacement_dead_letter(
    origin: Origin,
    failed_topic: str,
    failed_record: Mapping[str, Any],
    error: BaseException,
    *,
    is_dead_letter: bool,
    cap: int = DEAD_LETTER_ORIGINAL_CAP,
) -> DeadLetter:
    """The dead letter that takes the place of an output the broker refused for good.

    It always fits: at most `cap` bytes of the original (`extra.original_truncated`
    says whether it was cut), with `extra.original_bytes` (the full length) and
    `extra.original_sha256`; the complete original stays at its source position. When
    the refused output was itself a dead letter, its code and reason are kept.
    """
    original = origin.value or b""
    reason = f"{type(error).__name__}: {error}"[:_TEXT_CAP]
    if is_dead_letter:
        code = int(failed_record.get("error_code") or ErrorCode.INTERNAL)
        name = str(failed_record.get("error_name") or ErrorCode(code).name)
        stage = str(failed_record.get("stage") or "publish")
        message = str(failed_record.get("error_message") or "")[:_TEXT_CAP]
    else:
        too_large = isinstance(error, _TOO_LARGE)
        code = int(ErrorCode.OUTPUT_TOO_LARGE if too_large else ErrorCode.OUTPUT_UNENCODABLE)
        name, stage = ErrorCode(code).name, "publish"
        message = f"the {failed_topic} output of this input was refused: {reason}"[:_TEXT_CAP]
    return DeadLetter(
        original_value=original[:cap],
        original_key=(origin.key or b"")[:1024] or None,
        source=SourcePosition(origin.topic, origin.partition, origin.offset),
        error_code=code,
        error_name=name,
        error_message=message,
        stage=stage,
        failed_at_ms=now_ms(),
        request_uuid=_short(failed_record.get("request_uuid") or failed_record.get("uuid")),
        shippingid=_short(failed_record.get("shippingid")),
        extra={
            "original_bytes": str(len(original)),
            "original_sha256": hashlib.sha256(original).hexdigest(),
            "original_truncated": "true" if len(original) > cap else "false",
            "refused_output_topic": failed_topic,
            "publish_error": reason,
        },
    )


def _short(value: Any) -> str | None:
    return str(value)[:200] if value else None


@dataclass
class _Output:
    topic: str
    key: bytes | None
    record: Mapping[str, Any]
    origin: Origin | None
    value: bytes = b""
    delivery: Awaitable[Any] | None = None
    error: BaseException | None = None
    replaced: bool = False  # already a replacement dead letter


class EventWriter:
    """Encodes records with the topic's codec, sends them and collects delivery futures.

    `flush()` returns once the broker acknowledged every output (or its replacement dead
    letter, see the module docstring); until then the caller must not acknowledge its
    inputs. It raises only when cancelled.
    """

    def __init__(
        self,
        publisher: Publisher,
        codecs: Codecs,
        topics: Topics,
        *,
        first_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._publisher = publisher
        self._codecs = codecs
        self._topics = topics
        self._pending: list[_Output] = []
        self._first_delay_s = first_delay_s
        self._max_delay_s = max_delay_s
        self._sleep = sleep
        self.sent: dict[str, int] = {}
        self.replaced = 0

    async def write(
        self,
        topic: str,
        key: str | bytes | None,
        record: Mapping[str, Any],
        *,
        origin: Origin | None = None,
    ) -> None:
        """Encode and send one output of `origin` (the input it answers).

        Without an origin, an output the broker refuses for good is logged and dropped
        (review copies: no input depends on them).
        """
        encoded_key = key.encode("utf-8") if isinstance(key, str) else key
        output = _Output(topic, encoded_key, record, origin)
        self._pending.append(output)
        try:
            codec = self._codecs.for_schema(self._topics.schema_of(topic))
            # A registry outage while registering an output schema holds the batch, drops nothing.
            encode = functools.partial(codec.encode, record)
            output.value = await until_registry_answers(
                encode, f"encoding for {topic}", blocking=codec.needs_registry()
            )
        # Whatever stops the record from being encoded is the record's failure: it flows on
        # as data (a replacement dead letter); a registry outage was retried above.
        except Exception as exc:  # noqa: BLE001
            output.error = _Unencodable(f"{type(exc).__name__}: {exc}"[:_TEXT_CAP])
            return
        await self._send(output)

    async def _send(self, output: _Output) -> None:
        output.error = None
        try:
            output.delivery = await self._publisher.send(output.topic, output.key, output.value)
        # Refused before it left (too large for the producer, buffer full, ...): the error is
        # kept and `flush` retries it unless it is known to be permanent.
        except Exception as exc:  # noqa: BLE001
            output.delivery, output.error = None, exc

    async def flush(self) -> None:
        """Wait until every output is acknowledged; retry, replace or raise as documented."""
        pending, self._pending = self._pending, []
        delay = self._first_delay_s
        while pending:
            await self._await_deliveries(pending)
            failed = [output for output in pending if output.error is not None]
            for output in pending:
                if output.error is None:
                    self.sent[output.topic] = self.sent.get(output.topic, 0) + 1
            retry: list[_Output] = []
            for output in failed:
                error = output.error
                assert error is not None
                if is_permanent(error):
                    replacement = await self._replace(output, error)
                    if replacement is not None:
                        retry.append(replacement)
                else:
                    retry.append(output)
            transient = [o for o in retry if o.delivery is None and o.error is not None]
            if transient:
                log.warning(
                    "%d outputs not acknowledged (%s); retrying in %.1fs, nothing acknowledged",
                    len(transient),
                    type(transient[0].error).__name__,
                    delay,
                )
                await self._sleep(delay)
                delay = min(delay * 2, self._max_delay_s)
                for output in transient:
                    await self._send(output)
            pending = retry

    async def _await_deliveries(self, outputs: list[_Output]) -> None:
        waiting = [(o, o.delivery) for o in outputs if o.delivery is not None]
        results = await asyncio.gather(*(d for _, d in waiting), return_exceptions=True)
        for (output, _), result in zip(waiting, results, strict=True):
            output.delivery = None
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # cancellation: leave without acknowledging
                output.error = result

    async def _replace(self, output: _Output, error: BaseException) -> _Output | None:
        """A replacement dead letter for `output`, already sent; None when it is dropped."""
        if output.origin is None:
            log.error("dropping a %s output the broker refused for good: %s", output.topic, error)
            return None
        if output.replaced:
            # Even the capped dead letter was refused: keep trying, acknowledge nothing.
            log.critical("the replacement dead letter was refused too (%s); retrying", error)
            output.error = kafka_errors.KafkaError(str(error))
            return output
        letter = replacement_dead_letter(
            output.origin,
            output.topic,
            output.record,
            error,
            is_dead_letter=output.topic == self._topics.dead_letter,
        )
        log.error(
            "the broker refused the %s output of %s@%d:%d for good (%s); a capped dead letter "
            "takes its place",
            output.topic,
            output.origin.topic,
            output.origin.partition,
            output.origin.offset,
            type(error).__name__,
        )
        self.replaced += 1
        topic = self._topics.dead_letter
        codec = self._codecs.for_schema(self._topics.schema_of(topic))
        record = letter.to_event()
        replacement = _Output(topic, output.origin.key, record, output.origin, replaced=True)
        replacement.value = await until_registry_answers(
            functools.partial(codec.encode, record),
            f"encoding for {topic}",
            blocking=codec.needs_registry(),
        )
        await self._send(replacement)
        return replacement
