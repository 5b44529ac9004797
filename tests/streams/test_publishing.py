"""Publishing failures never lose an input: retry transient errors, replace refused outputs."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from aiokafka import errors as kafka_errors

from processors.errors import ErrorCode
from streams.agents import process_batch
from streams.codecs import Codecs
from streams.handlers import RawMessage
from streams.metrics import Metrics
from streams.publishing import DEAD_LETTER_ORIGINAL_CAP, EventWriter
from streams.settings import Topics
from tests.support.publishing import ScriptedPublisher

CODECS = Codecs()
TOPICS = Topics()
BIG_INPUT = b"{" + b"x" * (3 * DEAD_LETTER_ORIGINAL_CAP)
ORIGIN = RawMessage("pickup-completed", 2, 41, b"SHP-1", BIG_INPUT)


def decode(topic: str, value: bytes) -> dict[str, Any]:
    return CODECS.for_schema(TOPICS.schema_of(topic)).decode(value)


def dead_letter_record() -> dict[str, Any]:
    return {
        "original_value": BIG_INPUT,
        "original_key": b"SHP-1",
        "source_topic": "pickup-completed",
        "source_partition": 2,
        "source_offset": 41,
        "error_code": 1002,
        "error_name": "UNDECODABLE_MESSAGE",
        "error_message": "not JSON",
        "stage": "decode",
        "failed_at": 1,
        "request_uuid": None,
        "shippingid": None,
        "extra": {},
    }


async def no_sleep(_: float) -> None:
    return None


def writer_for(publisher: ScriptedPublisher) -> EventWriter:
    return EventWriter(publisher, CODECS, TOPICS, sleep=no_sleep)


def too_large_over(limit: int) -> Any:
    def fail(topic: str, value: bytes, attempt: int) -> BaseException | None:
        return kafka_errors.MessageSizeTooLargeError() if len(value) > limit else None

    return fail


@pytest.mark.parametrize("raise_now", [False, True])
async def test_a_dead_letter_too_large_for_the_broker_is_replaced_by_one_that_fits(
    raise_now: bool,
) -> None:
    publisher = ScriptedPublisher(too_large_over(2 * DEAD_LETTER_ORIGINAL_CAP), raise_now=raise_now)
    writer = writer_for(publisher)
    await writer.write("dead-letter", b"SHP-1", dead_letter_record(), origin=ORIGIN)
    await writer.flush()
    [(topic, key, value)] = publisher.sent
    letter = decode(topic, value)
    assert (topic, key) == ("dead-letter", b"SHP-1")
    assert letter["original_value"] == BIG_INPUT[:DEAD_LETTER_ORIGINAL_CAP]
    assert letter["extra"]["original_bytes"] == str(len(BIG_INPUT))
    assert letter["extra"]["original_sha256"] == hashlib.sha256(BIG_INPUT).hexdigest()
    assert letter["extra"]["original_truncated"] == "true"
    assert letter["extra"]["refused_output_topic"] == "dead-letter"
    assert "MessageSizeTooLargeError" in letter["extra"]["publish_error"]
    # The input's own reason is kept; its source position says where the whole original is.
    assert (letter["error_code"], letter["stage"]) == (1002, "decode")
    position = (letter["source_topic"], letter["source_partition"], letter["source_offset"])
    assert position == ("pickup-completed", 2, 41)
    assert writer.sent == {"dead-letter": 1} and writer.replaced == 1


async def test_an_output_its_schema_cannot_encode_becomes_a_dead_letter_of_its_input() -> None:
    decision = {"shippingid": "SHP-1", "uuid": "u-1", "idempotency_key": "k"}  # fields missing
    publisher = ScriptedPublisher(lambda topic, value, attempt: None)
    writer = writer_for(publisher)
    await writer.write("verification-decision", b"SHP-1", decision, origin=ORIGIN)
    await writer.flush()
    [(topic, _, value)] = publisher.sent
    letter = decode(topic, value)
    assert (topic, letter["error_code"]) == ("dead-letter", ErrorCode.OUTPUT_UNENCODABLE)
    assert letter["extra"]["refused_output_topic"] == "verification-decision"
    assert letter["stage"] == "publish" and letter["request_uuid"] == "u-1"


async def test_a_too_large_output_gets_the_too_large_code() -> None:
    def fail(topic: str, value: bytes, attempt: int) -> BaseException | None:
        return kafka_errors.RecordTooLargeError() if topic == "category-tag" else None

    publisher = ScriptedPublisher(fail)
    writer = writer_for(publisher)
    tag = {
        "product_id": "P-1",
        "category": "Boot",
        "score": 0.9,
        "top_categories": [],
        "tags": [],
        "used_text": True,
        "used_image": False,
        "model_version": "m",
        "idempotency_key": "k",
        "source": None,
    }
    small = RawMessage("product-listed", 0, 7, None, b'{"product_id": "P-1"}')
    await writer.write("category-tag", b"P-1", tag, origin=small)
    await writer.flush()
    [(topic, _, value)] = publisher.sent
    letter = decode(topic, value)
    assert (topic, letter["error_code"]) == ("dead-letter", ErrorCode.OUTPUT_TOO_LARGE)
    assert letter["original_value"] == small.value
    assert letter["extra"]["original_truncated"] == "false"


async def test_transient_errors_are_retried_until_acknowledged() -> None:
    def fail(topic: str, value: bytes, attempt: int) -> BaseException | None:
        return kafka_errors.RequestTimedOutError() if attempt <= 3 else None

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    publisher = ScriptedPublisher(fail)
    writer = EventWriter(publisher, CODECS, TOPICS, sleep=sleep, max_delay_s=1.5)
    await writer.write("dead-letter", b"SHP-1", dead_letter_record(), origin=ORIGIN)
    await writer.flush()
    [(topic, _, value)] = publisher.sent
    assert decode(topic, value)["original_value"] == BIG_INPUT  # the original, not a stand-in
    assert slept == [0.5, 1.0, 1.5] and writer.replaced == 0


async def test_an_output_without_an_input_is_dropped_when_refused() -> None:
    publisher = ScriptedPublisher(too_large_over(0))
    writer = writer_for(publisher)
    await writer.write("dead-letter", None, dead_letter_record())
    await writer.flush()
    assert publisher.sent == []


class FlakyHandler:
    agent = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0

    async def handle(self, messages: Any, writer: EventWriter) -> None:
        self.runs += 1
        await writer.write("dead-letter", b"k", dead_letter_record(), origin=messages[0])
        if self.runs <= self.failures:
            raise RuntimeError("unexpected")


class Event:
    def __init__(self, offset: int) -> None:
        self.message = type(
            "Message",
            (),
            {
                "topic": "pickup-completed",
                "partition": 0,
                "offset": offset,
                "key": None,
                "value": b"{}",
                "timestamp": 1.0,
            },
        )()
        self.acked = 0

    def ack(self) -> None:
        self.acked += 1


async def test_a_batch_that_raises_is_run_again_and_acknowledged_only_after_success() -> None:
    publisher = ScriptedPublisher(lambda topic, value, attempt: None)
    handler = FlakyHandler(failures=2)
    events = [Event(0), Event(1)]
    acked_during: list[int] = []

    async def sleep(_: float) -> None:
        acked_during.append(sum(e.acked for e in events))

    await process_batch(
        handler, events, lambda: EventWriter(publisher, CODECS, TOPICS), Metrics(), sleep=sleep
    )
    assert handler.runs == 3
    assert acked_during == [0, 0], "an input was acknowledged while its batch was failing"
    assert [e.acked for e in events] == [1, 1]
