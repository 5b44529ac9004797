"""Codecs: round trips in all three wire formats, and every class of bad input."""

from __future__ import annotations

import json
import os
import struct
import threading
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry.error import SchemaRegistryError

from processors.errors import ErrorCode, ProcessingError
from processors.records import PickupRequest
from streams.codecs import (
    CONFLUENT_MAGIC,
    SINGLE_OBJECT_MAGIC,
    Codecs,
    RegistryUnavailable,
    TopicCodec,
    crc64_avro,
    schema_fingerprint,
    until_registry_answers,
)

PICKUP = {
    "event_id": "evt-1",
    "occurred_at": 1_763_800_000_000,
    "pickupproductimage": ["https://cdn.example.com/a.jpg"],
    "skupickdone": ["aGVsbG8="],
    "productname": "Blue cotton T-shirt",
    "question": json.dumps(
        [
            {
                "Type": "boolean",
                "Label": "Is the colour blue?",
                "IsMandatory": True,
                "ValueToCheck": "Yes",
            }
        ]
    ),
    "shippingid": "SHP-1",
    "productid": "P-9",
    "uuid": None,
    "previousuuid": None,
}


@pytest.fixture
def codec() -> TopicCodec:
    return TopicCodec("pickup-completed")


def _code(codec: TopicCodec, data: bytes | None) -> ErrorCode:
    with pytest.raises(ProcessingError) as caught:
        codec.decode(data)
    assert caught.value.stage == "decode"
    assert caught.value.message
    return caught.value.code


def test_crc64_matches_the_avro_spec_vector() -> None:
    # The Avro spec fixes the fingerprint of the empty input to the CRC's seed value.
    assert crc64_avro(b"") == 0xC15D213AA4D7A795
    # A known value: fingerprint of the canonical form of "int" (from the Avro Java test suite).
    assert struct.pack("<Q", crc64_avro(b'"int"')).hex() == "8f5c393f1ad57572"


def test_single_object_round_trip(codec: TopicCodec) -> None:
    data = codec.encode(PICKUP)
    assert data[:2] == SINGLE_OBJECT_MAGIC
    assert data[2:10] == codec.fingerprint
    assert codec.decode(data) == PICKUP


def test_confluent_round_trip_with_mock_registry() -> None:
    codecs = Codecs("mock://codec-test")
    codec = codecs.for_schema("pickup-completed")
    data = codec.encode(PICKUP)
    assert data[:1] == CONFLUENT_MAGIC
    schema_id = struct.unpack(">I", data[1:5])[0]
    assert schema_id >= 1
    assert codec.decode(data) == PICKUP
    # A second codec over the same registry resolves the id it did not register itself.
    other = TopicCodec("pickup-completed", codecs.registry)
    assert other.decode(data) == PICKUP


def test_json_round_trip_fills_defaults_and_drops_unknown_fields(codec: TopicCodec) -> None:
    legacy = {k: v for k, v in PICKUP.items() if k not in {"event_id", "occurred_at", "productid"}}
    legacy["courier_note"] = "left at the door"
    decoded = codec.decode(codec.encode_json(legacy))
    assert decoded["event_id"] == ""
    assert decoded["productid"] is None
    assert "courier_note" not in decoded
    assert PickupRequest.from_event(decoded).shippingid == "SHP-1"


def test_every_topic_round_trips_its_records() -> None:
    codecs = Codecs()
    pickup = codecs.for_schema("pickup-completed")
    assert (
        pickup.decode(pickup.encode(PickupRequest.from_event(PICKUP).to_event()))["shippingid"]
        == "SHP-1"
    )


def test_empty_message(codec: TopicCodec) -> None:
    assert _code(codec, b"") is ErrorCode.EMPTY_MESSAGE
    assert _code(codec, None) is ErrorCode.EMPTY_MESSAGE


def test_truncated_avro(codec: TopicCodec) -> None:
    data = codec.encode(PICKUP)
    assert _code(codec, data[: len(data) // 2]) is ErrorCode.UNDECODABLE_MESSAGE
    assert _code(codec, data[:6]) is ErrorCode.UNDECODABLE_MESSAGE


def test_trailing_garbage_after_avro_is_refused(codec: TopicCodec) -> None:
    assert _code(codec, codec.encode(PICKUP) + b"\x00\x01") is ErrorCode.UNDECODABLE_MESSAGE


def test_wrong_magic_byte(codec: TopicCodec) -> None:
    data = codec.encode(PICKUP)
    assert _code(codec, b"\x07" + data[1:]) is ErrorCode.UNDECODABLE_MESSAGE


def test_unknown_fingerprint(codec: TopicCodec) -> None:
    data = codec.encode(PICKUP)
    assert _code(codec, SINGLE_OBJECT_MAGIC + b"\xff" * 8 + data[10:]) is ErrorCode.UNKNOWN_SCHEMA


def test_unknown_confluent_schema_id_without_and_with_registry(codec: TopicCodec) -> None:
    framed = CONFLUENT_MAGIC + struct.pack(">I", 4242) + b"\x02"
    assert _code(codec, framed) is ErrorCode.UNKNOWN_SCHEMA
    with_registry = Codecs("mock://unknown-id").for_schema("pickup-completed")
    assert _code(with_registry, framed) is ErrorCode.UNKNOWN_SCHEMA


class _Down:
    """A registry client double that never answers, like one behind a refused connection."""

    def __init__(self, status: int | None = None) -> None:
        self.status = status
        self.calls = 0

    def _fail(self, *_: object) -> None:
        self.calls += 1
        if self.status is None:
            raise ConnectionRefusedError(111, "Connection refused")
        raise SchemaRegistryError(self.status, self.status * 100 + 3, "registry says no")

    get_schema = _fail
    register_schema = _fail


@pytest.mark.parametrize("status", [None, 500, 503, 401, 429])
def test_a_registry_that_does_not_answer_is_not_an_unknown_schema(status: int | None) -> None:
    codec = TopicCodec("pickup-completed", _Down(status))
    framed = CONFLUENT_MAGIC + struct.pack(">I", 7) + b"\x02"
    with pytest.raises(RegistryUnavailable):
        codec.decode(framed)
    with pytest.raises(RegistryUnavailable):
        codec.encode(PICKUP)


def test_a_registry_404_is_an_unknown_schema() -> None:
    codec = TopicCodec("pickup-completed", _Down(404))
    framed = CONFLUENT_MAGIC + struct.pack(">I", 7) + b"\x02"
    assert _code(codec, framed) is ErrorCode.UNKNOWN_SCHEMA


class _ComesBack:
    """A registry client double that is down for its first `outage` calls, then answers."""

    def __init__(self, registry: Any, outage: int) -> None:
        self.down = _Down()
        self.registry = registry
        self.outage = outage

    def get_schema(self, schema_id: int) -> object:
        if self.down.calls < self.outage:
            self.down.get_schema(schema_id)  # raises: the registry is down
        return self.registry.get_schema(schema_id)


async def test_until_registry_answers_waits_out_an_outage_and_returns() -> None:
    codecs = Codecs("mock://comes-back")
    framed = codecs.for_schema("pickup-completed").encode(PICKUP)
    registry = _ComesBack(codecs.registry, outage=3)
    reader = TopicCodec("pickup-completed", registry)

    record = await until_registry_answers(lambda: reader.decode(framed), "test", first_delay_s=0.01)
    assert record["shippingid"] == PICKUP["shippingid"] and registry.down.calls == 3


def test_only_uncached_confluent_ids_and_the_first_encode_need_the_registry() -> None:
    codec = Codecs("mock://needs").for_schema("pickup-completed")
    assert codec.needs_registry()  # the first encode registers the schema
    framed = codec.encode(PICKUP)
    assert not codec.needs_registry() and not codec.needs_registry(framed)
    assert codec.needs_registry(CONFLUENT_MAGIC + struct.pack(">I", 4242) + b"\x02")
    assert not codec.needs_registry(codec.encode_json(PICKUP))
    assert not Codecs().for_schema("pickup-completed").needs_registry(framed)


async def test_blocking_registry_calls_run_off_the_event_loop() -> None:
    threads = []

    def call() -> int:
        threads.append(threading.current_thread())
        return 7

    assert await until_registry_answers(call, "test", blocking=True) == 7
    assert await until_registry_answers(call, "test") == 7
    assert threads[0] is not threading.main_thread() and threads[1] is threading.main_thread()


def test_json_missing_a_required_field(codec: TopicCodec) -> None:
    broken = {k: v for k, v in PICKUP.items() if k != "shippingid"}
    assert _code(codec, json.dumps(broken).encode()) is ErrorCode.INVALID_EVENT


def test_json_with_a_wrong_type(codec: TopicCodec) -> None:
    broken = {**PICKUP, "skupickdone": "not-a-list"}
    assert _code(codec, json.dumps(broken).encode()) is ErrorCode.INVALID_EVENT


def test_invalid_json_and_non_object_json(codec: TopicCodec) -> None:
    assert _code(codec, b'{"shippingid": ') is ErrorCode.UNDECODABLE_MESSAGE
    assert _code(codec, b"[1, 2, 3]") is ErrorCode.UNDECODABLE_MESSAGE


def test_ten_megabytes_of_junk(codec: TopicCodec) -> None:
    junk = os.urandom(10 * 1024 * 1024)
    code = _code(codec, b"\x13" + junk)
    assert code is ErrorCode.UNDECODABLE_MESSAGE
    # Past the size limit it is refused before any parsing.
    with pytest.raises(ProcessingError) as caught:
        codec.decode(junk, max_bytes=1024)
    assert caught.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_junk_that_starts_like_single_object_avro(codec: TopicCodec) -> None:
    data = SINGLE_OBJECT_MAGIC + codec.fingerprint + os.urandom(4096)
    assert _code(codec, data) in {ErrorCode.UNDECODABLE_MESSAGE, ErrorCode.INVALID_EVENT}


def test_encode_refuses_a_record_that_breaks_the_schema(codec: TopicCodec) -> None:
    with pytest.raises(ProcessingError) as caught:
        codec.encode({**PICKUP, "skupickdone": 3})
    assert caught.value.code is ErrorCode.INVALID_EVENT


def test_fingerprint_is_of_the_canonical_form() -> None:
    schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "X",
            "doc": "ignored",
            "fields": [{"name": "a", "type": "int", "doc": "also ignored"}],
        }
    )
    same = fastavro.parse_schema(
        {"type": "record", "name": "X", "fields": [{"name": "a", "type": "int"}]}
    )
    assert schema_fingerprint(schema) == schema_fingerprint(same)
