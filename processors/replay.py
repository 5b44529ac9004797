"""Replay: re-decide recorded requests from their recorded model outputs (no GPU, no network).

Each recorded line is `{"request": {pickup-completed fields}, "model_outputs": [text, ...]}`
(or, with `join_recorded`, a bare event plus a `{"uuid", "model_outputs"}` line). The lines
run through the real `VerificationPipeline` with a `ReplayEngine`, so a replay decides
exactly as the worker would; a line whose request is invalid or whose verification failed
yields the former service's error record (`failure_event`, docs/former-service.md).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processors.errors import ErrorCode, Failure, ProcessingError
from processors.inference import ReplayEngine
from processors.records import PickupRequest
from processors.verification import VerificationInput, VerificationPipeline


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What `replay_jsonl` wrote: line counts and failures per error name."""

    total: int
    decided: int
    failed: int
    failures_by_code: dict[str, int]
    out_path: Path


def failure_event(shippingid: Any, uuid: Any, failure: Failure) -> dict[str, Any]:
    """The error record of a failed request: `{shippingid, uuid, errorMsg, code}`.

    The former service's error shape (docs/former-service.md, "Errors"), with the
    failure's own code instead of 1099.
    """
    return {
        "shippingid": shippingid if isinstance(shippingid, str) else None,
        "uuid": uuid if isinstance(uuid, str) else None,
        "errorMsg": str(failure),
        "code": int(failure.code),
    }


@dataclass(frozen=True, slots=True)
class _ReplayLine:
    raw: Mapping[str, Any]
    request: PickupRequest | None
    outputs: tuple[str, ...]
    failure: Failure | None


def _read_replay_line(line: Any) -> _ReplayLine:
    if isinstance(line, Failure):
        return _ReplayLine({}, None, (), line)
    if not isinstance(line, Mapping) or not isinstance(line.get("request"), Mapping):
        failure = Failure(ErrorCode.INVALID_EVENT, "replay line needs a 'request' object", "replay")
        return _ReplayLine({}, None, (), failure)
    raw: Mapping[str, Any] = line["request"]
    outputs = line.get("model_outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        failure = Failure(
            ErrorCode.INVALID_EVENT, "'model_outputs' must be a list of strings", "replay"
        )
        return _ReplayLine(raw, None, (), failure)
    try:
        request = PickupRequest.from_event(raw)
    except ProcessingError as exc:
        return _ReplayLine(raw, None, (), exc.to_failure("decode"))
    return _ReplayLine(raw, request, tuple(outputs), None)


def _chunks(lines: Iterable[_ReplayLine], size: int) -> Iterator[list[_ReplayLine]]:
    """Batches of at most `size`; a uuid seen twice starts a new batch.

    The `ReplayEngine` of a batch is keyed by request uuid.
    """
    chunk: list[_ReplayLine] = []
    seen: set[str] = set()
    for line in lines:
        uuid = line.request.uuid if line.request else None
        if len(chunk) >= size or (uuid is not None and uuid in seen):
            yield chunk
            chunk, seen = [], set()
        chunk.append(line)
        if uuid is not None:
            seen.add(uuid)
    if chunk:
        yield chunk


async def replay_batch(
    lines: Sequence[Any],
    *,
    batch_id: str = "replay",
    clock: Callable[[], datetime] = _utc_now,
    model_version: str = "replay",
) -> list[dict[str, Any]]:
    """Replay one batch of recorded lines (no uuid twice); one output dict per line, in order.

    Each line is `{"request": {pickup-completed fields}, "model_outputs": [text, ...]}`. The
    output is `VerificationDecision.to_event()`, or `failure_event(...)` for a line whose
    request is invalid or whose verification failed.
    """
    parsed = [_read_replay_line(line) for line in lines]
    return await _replay_parsed(parsed, batch_id=batch_id, clock=clock, model_version=model_version)


async def _replay_parsed(
    parsed: Sequence[_ReplayLine],
    *,
    batch_id: str,
    clock: Callable[[], datetime],
    model_version: str,
) -> list[dict[str, Any]]:
    outputs = {line.request.uuid: line.outputs for line in parsed if line.request is not None}
    pipeline = VerificationPipeline(
        ReplayEngine(outputs, version=model_version), images=None, tiling=None, clock=clock
    )
    inputs = [VerificationInput(line.request) for line in parsed if line.request is not None]
    outcomes = iter(await pipeline.run(inputs, batch_id=batch_id))
    results: list[dict[str, Any]] = []
    for line in parsed:
        if line.request is None:
            failure = line.failure or Failure(ErrorCode.INTERNAL, "unreadable line", "replay")
            results.append(failure_event(line.raw.get("shippingid"), line.raw.get("uuid"), failure))
            continue
        outcome = next(outcomes)
        if outcome.decision is not None:
            results.append(outcome.decision.to_event())
        else:
            assert outcome.failure is not None  # VerificationOutcome guarantees one of both
            results.append(
                failure_event(line.request.shippingid, line.request.uuid, outcome.failure)
            )
    return results


def replay_records(
    lines: Iterable[Any],
    *,
    batch_size: int = 32,
    clock: Callable[[], datetime] = _utc_now,
    model_version: str = "replay",
) -> Iterator[dict[str, Any]]:
    """Re-decide recorded requests: one output dict per input line, in input order.

    Synchronous and lazy: batches of `batch_size` run through `VerificationPipeline` with a
    `ReplayEngine`, each in its own `asyncio.run`, so it must not be called from a running
    event loop (use `replay_batch` there). No Kafka, GPU or network is touched.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    parsed = (_read_replay_line(line) for line in lines)
    for number, chunk in enumerate(_chunks(parsed, batch_size)):
        yield from asyncio.run(
            _replay_parsed(
                chunk, batch_id=f"replay-{number}", clock=clock, model_version=model_version
            )
        )


def _read_jsonl(path: Path) -> Iterator[Any]:
    """Decoded lines; a line that is not JSON becomes a `Failure` so it keeps its position."""
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                yield json.loads(text)
            except ValueError as exc:
                yield Failure(
                    ErrorCode.UNDECODABLE_MESSAGE, f"line {number} is not JSON: {exc}", "replay"
                )


def join_recorded(events: Iterable[Any], recorded: Iterable[Any]) -> Iterator[Any]:
    """Replay lines from bare `pickup-completed` events and `{"uuid", "model_outputs"}` lines.

    Outputs are matched by the event's `uuid` field; an event with no recording gets no
    outputs (its replay fails with MODEL_FAILED). Non-dict events pass through unchanged,
    so they become error records in their place.
    """
    by_uuid: dict[str, list[str]] = {}
    for line in recorded:
        if isinstance(line, Mapping) and isinstance(line.get("uuid"), str):
            by_uuid[line["uuid"]] = list(line.get("model_outputs") or [])
    for event in events:
        if not isinstance(event, Mapping):
            yield event
            continue
        uuid = event.get("uuid")
        outputs = by_uuid.get(uuid, []) if isinstance(uuid, str) else []
        yield {"request": event, "model_outputs": outputs}


def replay_jsonl(
    in_path: str | Path,
    out_path: str | Path,
    *,
    recorded_path: str | Path | None = None,
    batch_size: int = 32,
    clock: Callable[[], datetime] = _utc_now,
) -> ReplaySummary:
    """Replay a JSONL file of recorded lines into a JSONL file of decisions and errors.

    Without `recorded_path`, each input line is `{"request": {...}, "model_outputs": [...]}`.
    With it, `in_path` holds bare pickup-completed events and `recorded_path` the
    `{"uuid", "model_outputs"}` lines (see `join_recorded`; the demo samples use this form).
    Blank lines are skipped; a line that is not JSON yields an error record in its place.
    Raises OSError when a file cannot be read or written.
    """
    source, target = Path(in_path), Path(out_path)
    lines: Iterable[Any] = _read_jsonl(source)
    if recorded_path is not None:
        lines = join_recorded(lines, _read_jsonl(Path(recorded_path)))
    counts: Counter[str] = Counter()
    total = decided = 0
    with target.open("w", encoding="utf-8") as out:
        for result in replay_records(lines, batch_size=batch_size, clock=clock):
            total += 1
            if "errorMsg" in result:
                counts[ErrorCode(result["code"]).name] += 1
            else:
                decided += 1
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
    return ReplaySummary(total, decided, total - decided, dict(counts), target)
