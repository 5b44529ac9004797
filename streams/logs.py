"""Logging set-up: JSON lines for machines, plain text on a terminal.

Both formats redact what must never reach a log: the password of
`scheme://user:password@host` URLs, and anything that looks like a base64 body (a
run of more than 200 base64 characters, e.g. an inline pickup image). Redaction
covers the message, every `extra` field (nested dicts and lists included) and
exception text; `bytes` fields are logged as their length only.

`log_outcome` writes the one structured line per processed event.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from processors.errors import ErrorCode

# Attributes a LogRecord always has; anything else was passed through `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

#: Longer runs of base64 characters than this are replaced.
MAX_BASE64_RUN: Final = 200
_BASE64_RUN = re.compile("[A-Za-z0-9+/=]{" + str(MAX_BASE64_RUN + 1) + ",}")
# The password between `scheme://user:` and `@`.
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@\s]+):([^@/\s]*)@")


def redact_passwords(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` replaced by `***`."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def redact_text(text: str) -> str:
    """`text` with URL passwords replaced by `***` and long base64 runs by a marker."""
    text = redact_passwords(text)
    return _BASE64_RUN.sub(lambda m: f"<redacted {len(m.group())} base64 chars>", text)


def _scrub(value: Any) -> Any:
    """A JSON-ready copy of an `extra` value with every string redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_text(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every `extra` field.

    Every string is redacted (see the module docstring); never raises for an
    unserialisable `extra` value (it is logged as its redacted `str()`).
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one redacted JSON line."""
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        payload.update({k: _scrub(v) for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            payload["exception"] = redact_text(self.formatException(record.exc_info))
        if record.stack_info:
            payload["stack"] = redact_text(self.formatStack(record.stack_info))
        return json.dumps(payload, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message` for terminals, with the same redaction."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as one redacted text line."""
        return redact_text(super().format(record))


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Install one handler on the root logger (`json`, `text`, or `auto` by terminal)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_outcome(
    logger: logging.Logger,
    *,
    request_uuid: str | None,
    shippingid: str | None,
    topic: str,
    partition: int,
    offset: int,
    outcome: str,
    code: int | None = None,
    timings: Mapping[str, float] | None = None,
) -> None:
    """Log one line for one event's outcome, with every argument as a structured field.

    `outcome` is a short word ("decision", "category", "dead_letter", ...); `code` the
    error code of a failure (the line is then logged at WARNING, otherwise at INFO);
    `timings` phase → milliseconds. Only identifiers and numbers are logged, never an
    event body; the fields are redacted like any other. `code_name` is added when
    `code` is a known `ErrorCode`.
    """
    fields: dict[str, Any] = {
        "event": "outcome",
        "request_uuid": request_uuid,
        "shippingid": shippingid,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "outcome": outcome,
    }
    if code is not None:
        fields["code"] = int(code)
        fields["code_name"] = _code_name(int(code))
    if timings:
        fields["timings_ms"] = {phase: round(float(ms), 3) for phase, ms in timings.items()}
    level = logging.INFO if code is None else logging.WARNING
    logger.log(
        level,
        "%s %s@%d:%d uuid=%s shippingid=%s%s",
        outcome,
        topic,
        partition,
        offset,
        request_uuid,
        shippingid,
        f" code={int(code)}" if code is not None else "",
        extra=fields,
    )


def _code_name(code: int) -> str | None:
    try:
        return ErrorCode(code).name
    except ValueError:
        return None


def logging_config(log_format: str, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` dict for the worker (faust's `logging_config`).

    `json` (one object per line), `text`, or `auto`: text on a terminal, JSON otherwise.
    """
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    formatter = "streams.logs.JsonFormatter" if use_json else "streams.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"visionstream": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "visionstream",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level, "handlers": ["stderr"]},
    }
