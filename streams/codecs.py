"""Wire formats of every topic: Confluent Avro, Avro single-object, and plain JSON.

Encoding: with a schema registry configured, Confluent framing
(magic byte 0 + 4-byte big-endian schema id + Avro binary), the schema registered
under the subject `<topic>-value`; otherwise Avro single-object encoding
(`C3 01` + 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
parsing canonical form + Avro binary).

Decoding accepts all three: Confluent framing (writer schema fetched from the
registry by id), single-object (writer schema found by fingerprint among every
released version under `schemas/avro/`), and a plain JSON object (so `kcat` and
legacy producers work), always resolved to the topic's latest schema. Anything
else raises `ProcessingError` with a code and stage "decode"; the caller routes it
to the dead-letter topic. Nothing here crashes on input.

A schema id the registry does not know (HTTP 404) is bad input: `UNKNOWN_SCHEMA`. A
registry that does not answer (refused, timed out, 5xx, 401/403/429) is no fault of the
event: `RegistryUnavailable`, which the caller waits out with `until_registry_answers`
and acknowledges nothing meanwhile. Schemas already fetched or registered are cached,
so only new ids need the registry.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import fastavro
from fastavro.validation import validate as avro_validate

from processors.errors import ErrorCode, ProcessingError
from schemas import avro_schema_json, avro_topics, avro_versions

T = TypeVar("T")
log = logging.getLogger(__name__)

CONFLUENT_MAGIC = b"\x00"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_STAGE = "decode"

_CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Avro specification's CRC-64-AVRO (Rabin) fingerprint of `data`."""
    fp = _CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp


def schema_fingerprint(parsed_schema: Any) -> bytes:
    """8-byte little-endian CRC-64-AVRO of the schema's parsing canonical form."""
    canonical = fastavro.schema.to_parsing_canonical_form(parsed_schema)
    return struct.pack("<Q", crc64_avro(canonical.encode("utf-8")))


class RegistryUnavailable(Exception):
    """The schema registry gave no answer about a schema; retry later, drop nothing."""


# Statuses that say nothing about the schema: the registry is down, overloaded or refuses us.
_TRANSIENT_STATUSES = {401, 403, 408, 429}


def _is_transient(exc: Exception) -> bool:
    """True unless the registry itself answered with a 4xx about the request."""
    status = getattr(exc, "http_status_code", None)
    if not isinstance(status, int) or status < 0:
        return True  # transport errors (connection refused, timeouts) carry no status
    return status >= 500 or status in _TRANSIENT_STATUSES


async def until_registry_answers(
    call: Callable[[], T],
    what: str,
    *,
    blocking: bool = False,
    first_delay_s: float = 0.5,
    max_delay_s: float = 5.0,
) -> T:
    """Run `call` until it stops raising `RegistryUnavailable`, backing off up to `max_delay_s`.

    Other exceptions propagate at once. Used around decode and encode so that a registry
    outage holds the batch (nothing acknowledged, nothing dead-lettered) instead of losing it.
    `blocking`: `call` will ask the registry (`TopicCodec.needs_registry`), a blocking HTTP
    call with its own retries, so it runs in a thread and the event loop (heartbeats) goes on.
    """
    delay = first_delay_s
    while True:
        try:
            return await asyncio.to_thread(call) if blocking else call()
        except RegistryUnavailable as exc:
            log.warning("%s: %s; retrying in %.1fs, nothing acknowledged", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def _epoch_ms(value: Any) -> Any:
    # fastavro turns timestamp-millis into datetimes; records carry plain epoch ms.
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return value


class TopicCodec:
    """Encode and decode one topic's events (see the module docstring)."""

    def __init__(self, topic: str, registry: Any | None = None) -> None:
        self.topic = topic
        self._registry = registry
        self._reader = fastavro.parse_schema(avro_schema_json(topic))
        self._fingerprint = schema_fingerprint(self._reader)
        self._writers_by_fingerprint: dict[bytes, Any] = {}
        for version in avro_versions(topic):
            parsed = fastavro.parse_schema(avro_schema_json(topic, version))
            self._writers_by_fingerprint[schema_fingerprint(parsed)] = parsed
        self._registry_id: int | None = None
        self._writers_by_id: dict[int, Any] = {}
        self._field_defaults = {
            field["name"]: field["default"]
            for field in avro_schema_json(topic)["fields"]
            if "default" in field
        }

    @property
    def fingerprint(self) -> bytes:
        """The reader schema's CRC-64-AVRO fingerprint (single-object encoding)."""
        return self._fingerprint

    def needs_registry(self, data: bytes | None = None) -> bool:
        """Whether decoding `data` (without it: encoding) must ask the registry first.

        True for a Confluent-framed value whose schema id is not cached yet, or for the
        first encode with a registry; everything else is answered from memory.
        """
        if self._registry is None:
            return False
        if data is None:
            return self._registry_id is None
        if len(data) < 5 or data[:1] != CONFLUENT_MAGIC:
            return False
        return struct.unpack(">I", data[1:5])[0] not in self._writers_by_id

    # -- encoding ------------------------------------------------------------------

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Avro-encode `record` (Confluent framing with a registry, else single-object).

        Raises `ProcessingError(INVALID_EVENT)` when the record breaks the schema.
        """
        body = io.BytesIO()
        try:
            fastavro.schemaless_writer(body, self._reader, dict(record))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ProcessingError(
                ErrorCode.INVALID_EVENT,
                f"{self.topic}: record does not fit schema: {exc}",
                "encode",
            ) from exc
        if self._registry is not None:
            return CONFLUENT_MAGIC + struct.pack(">I", self._schema_id()) + body.getvalue()
        return SINGLE_OBJECT_MAGIC + self._fingerprint + body.getvalue()

    def encode_json(self, record: Mapping[str, Any]) -> bytes:
        """Plain JSON, as a legacy producer would send it (bytes fields not supported)."""
        return json.dumps(dict(record), ensure_ascii=False).encode("utf-8")

    def _schema_id(self) -> int:
        if self._registry_id is None:
            from confluent_kafka.schema_registry import Schema

            assert self._registry is not None
            schema = Schema(json.dumps(avro_schema_json(self.topic)), "AVRO")
            try:
                registered = self._registry.register_schema(f"{self.topic}-value", schema)
            except Exception as exc:  # the registry client raises several unrelated types
                if _is_transient(exc):
                    raise RegistryUnavailable(
                        f"cannot register the {self.topic} schema: {exc}"
                    ) from exc
                raise
            self._registry_id = int(registered)
            self._writers_by_id[self._registry_id] = self._reader
        return self._registry_id

    # -- decoding ------------------------------------------------------------------

    def decode(self, data: bytes | None, *, max_bytes: int = 16 * 1024 * 1024) -> dict[str, Any]:
        """Decode any accepted wire format into a dict shaped by the latest schema."""
        if not data:
            raise ProcessingError(ErrorCode.EMPTY_MESSAGE, "message has no value", _STAGE)
        if len(data) > max_bytes:
            raise ProcessingError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"message is {len(data)} bytes, limit is {max_bytes}",
                _STAGE,
            )
        if data[:2] == SINGLE_OBJECT_MAGIC:
            return self._decode_single_object(data)
        if data[:1] == CONFLUENT_MAGIC:
            return self._decode_confluent(data)
        if data.lstrip()[:1] == b"{":
            return self._decode_json(data)
        raise ProcessingError(
            ErrorCode.UNDECODABLE_MESSAGE,
            f"{self.topic}: not Avro (magic {data[:2].hex()}) and not a JSON object",
            _STAGE,
        )

    def _decode_single_object(self, data: bytes) -> dict[str, Any]:
        if len(data) < 10:
            raise ProcessingError(
                ErrorCode.UNDECODABLE_MESSAGE, "single-object header is truncated", _STAGE
            )
        writer = self._writers_by_fingerprint.get(data[2:10])
        if writer is None:
            raise ProcessingError(
                ErrorCode.UNKNOWN_SCHEMA,
                f"{self.topic}: unknown schema fingerprint {data[2:10].hex()}",
                _STAGE,
            )
        return self._read_avro(data[10:], writer)

    def _decode_confluent(self, data: bytes) -> dict[str, Any]:
        if len(data) < 5:
            raise ProcessingError(
                ErrorCode.UNDECODABLE_MESSAGE, "Confluent header is truncated", _STAGE
            )
        (schema_id,) = struct.unpack(">I", data[1:5])
        writer = self._writers_by_id.get(schema_id)
        if writer is None:
            writer = self._fetch_writer(schema_id)
        return self._read_avro(data[5:], writer)

    def _fetch_writer(self, schema_id: int) -> Any:
        if self._registry is None:
            raise ProcessingError(
                ErrorCode.UNKNOWN_SCHEMA,
                f"{self.topic}: Confluent schema id {schema_id} but no schema registry configured",
                _STAGE,
            )
        try:
            schema = self._registry.get_schema(schema_id)
        except Exception as exc:  # the registry client raises several unrelated types
            if _is_transient(exc):
                raise RegistryUnavailable(
                    f"{self.topic}: cannot fetch schema id {schema_id}: {exc}"
                ) from exc
            raise ProcessingError(
                ErrorCode.UNKNOWN_SCHEMA,
                f"{self.topic}: schema id {schema_id} not found in the registry: {exc}",
                _STAGE,
            ) from exc
        try:
            writer = fastavro.parse_schema(json.loads(schema.schema_str))
        except Exception as exc:  # not JSON, or not an Avro schema
            raise ProcessingError(
                ErrorCode.UNKNOWN_SCHEMA,
                f"{self.topic}: schema id {schema_id} is not a usable Avro schema: {exc}",
                _STAGE,
            ) from exc
        self._writers_by_id[schema_id] = writer
        return writer

    def _read_avro(self, body: bytes, writer: Any) -> dict[str, Any]:
        stream = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(stream, writer, self._reader)
        except Exception as exc:  # truncated or corrupt Avro raises EOFError, ValueError, ...
            raise ProcessingError(
                ErrorCode.UNDECODABLE_MESSAGE,
                f"{self.topic}: corrupt Avro body ({type(exc).__name__}: {exc})",
                _STAGE,
            ) from exc
        if stream.tell() != len(body):
            raise ProcessingError(
                ErrorCode.UNDECODABLE_MESSAGE,
                f"{self.topic}: {len(body) - stream.tell()} trailing bytes after the Avro record",
                _STAGE,
            )
        if not isinstance(record, dict):
            raise ProcessingError(
                ErrorCode.UNDECODABLE_MESSAGE, "Avro body is not a record", _STAGE
            )
        return {key: _epoch_ms(value) for key, value in record.items()}

    def _decode_json(self, data: bytes) -> dict[str, Any]:
        try:
            loaded = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProcessingError(
                ErrorCode.UNDECODABLE_MESSAGE, f"{self.topic}: invalid JSON: {exc}", _STAGE
            ) from exc
        if not isinstance(loaded, dict):
            raise ProcessingError(ErrorCode.UNDECODABLE_MESSAGE, "JSON is not an object", _STAGE)
        record = {**self._field_defaults, **loaded}
        try:
            avro_validate(record, self._reader, raise_errors=True)
        except Exception as exc:  # ValidationError carries every failing field
            raise ProcessingError(
                ErrorCode.INVALID_EVENT,
                f"{self.topic}: JSON event breaks the contract: {str(exc)[:500]}",
                _STAGE,
            ) from exc
        known = {field["name"] for field in avro_schema_json(self.topic)["fields"]}
        return {key: value for key, value in record.items() if key in known}


class Codecs:
    """One `TopicCodec` per contract, sharing an optional schema registry client."""

    def __init__(self, schema_registry_url: str | None = None) -> None:
        self.registry: Any | None = None
        if schema_registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            # new_client() returns the in-memory mock for mock:// URLs (tests).
            self.registry = SchemaRegistryClient.new_client({"url": schema_registry_url})
        self._by_schema = {name: TopicCodec(name, self.registry) for name in avro_topics()}

    def for_schema(self, schema_name: str) -> TopicCodec:
        """The codec of a contract, e.g. "pickup-completed"; KeyError if there is none."""
        return self._by_schema[schema_name]


def now_ms() -> int:
    """The wall clock in epoch milliseconds (UTC)."""
    return int(datetime.now(UTC).timestamp() * 1000)
