"""Error codes and the failure record that carries them.

The HTTP service this project replaces used one code (1099) for every failure.
Here each class of failure has its own code, grouped by the phase that raises it,
so the dead-letter topic and the analytics tables can be grouped by cause.

Failures flow as data: a phase that cannot handle one item returns a `Failure`
for it (or raises `ProcessingError`, which the batch runner converts), and the
rest of the batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ErrorCode(IntEnum):
    """Documented error codes; a test keeps the README's table in step with this enum."""

    # 10xx: the message itself (decoding, contract)
    EMPTY_MESSAGE = 1001
    """The Kafka message had no value bytes."""
    UNDECODABLE_MESSAGE = 1002
    """Bytes are neither Confluent Avro, Avro single-object nor a JSON object."""
    UNKNOWN_SCHEMA = 1003
    """Avro framing names a schema id or fingerprint that is not known."""
    INVALID_EVENT = 1004
    """The event decoded but breaks the contract (missing or mistyped field)."""
    MESSAGE_TOO_LARGE = 1005
    """The message is larger than the configured maximum."""

    # 11xx: request content
    INVALID_QUESTION = 1101
    """The `question` field is not a list of question objects."""
    INVALID_REQUEST = 1102
    """Image counts or required text fields are out of bounds."""

    # 12xx: images
    IMAGE_DOWNLOAD_FAILED = 1201
    """HTTP error or connection failure after retries."""
    IMAGE_TOO_LARGE = 1202
    """Image body over the byte limit, or pixel count over the bomb limit."""
    IMAGE_TIMEOUT = 1203
    """Image download ran past its connect or total timeout."""
    IMAGE_ADDRESS_REFUSED = 1204
    """Scheme not http(s), or host resolves to a private, loopback or link-local address."""
    IMAGE_DECODE_FAILED = 1205
    """Bytes are not an image Pillow can decode."""
    IMAGE_BASE64_INVALID = 1206
    """A pickup image is neither a URL nor valid base64."""

    # 13xx: the model
    MODEL_OUTPUT_INVALID = 1301
    """The model's answer failed JSON extraction or schema validation twice."""
    MODEL_FAILED = 1302
    """The inference engine raised."""
    UNKNOWN_RECOMMENDATION = 1303
    """The answer's recommendation is not Accept, Reject, Partial or Retry."""
    MODEL_NOT_LOADED = 1304
    """No engine is loaded (start-up did not complete)."""

    # 14xx: categorization
    NO_USABLE_INPUT = 1401
    """A listing has neither usable text nor a usable image."""

    # 15xx: publishing outputs
    OUTPUT_TOO_LARGE = 1501
    """An output of the input is larger than the broker accepts; a capped dead letter replaces it."""
    OUTPUT_UNENCODABLE = 1502
    """An output of the input does not fit its topic's schema; a dead letter replaces it."""

    # 19xx: everything else
    INTERNAL = 1901
    """An unexpected exception; the message carries its type and text."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One item that could not be processed: a code, a human-readable reason and the phase."""

    code: ErrorCode
    message: str
    stage: str

    def __str__(self) -> str:
        return f"[{int(self.code)} {self.code.name}] {self.stage}: {self.message}"


class ProcessingError(Exception):
    """Raised inside a phase for one item; batch runners turn it into a `Failure`."""

    def __init__(self, code: ErrorCode, message: str, stage: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.stage = stage

    def to_failure(self, stage: str | None = None) -> Failure:
        """This error as a `Failure`; `stage` overrides the error's own, else "unknown"."""
        return Failure(self.code, self.message, stage or self.stage or "unknown")


def failure_from_exception(exc: BaseException, stage: str) -> Failure:
    """Map any exception to a `Failure`; unexpected ones become `INTERNAL`."""
    if isinstance(exc, ProcessingError):
        return exc.to_failure(stage)
    return Failure(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:2000], stage)
