"""Tests of processors.replay: recorded lines re-decided through the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from processors.prompt import parse_questions
from processors.records import PickupRequest
from processors.replay import join_recorded, replay_batch, replay_jsonl, replay_records
from tests.processors.test_verification import INVALID, NOW, REPO, _answer, _event


def _line(n: int, outputs: list[str], **changes: Any) -> dict[str, Any]:
    return {"request": _event(n, **changes), "model_outputs": outputs}


async def test_replay_batch_outputs_events_and_error_records_in_order() -> None:
    lines = [
        _line(1, [_answer()]),
        {"request": {"shippingid": "SHIP-X"}, "model_outputs": []},
        _line(3, [INVALID, INVALID]),
        "not an object",
        {"request": _event(5), "model_outputs": "nope"},
    ]
    results = await replay_batch(lines, clock=lambda: NOW)
    assert len(results) == 5
    assert results[0]["ai_decision"] == "Pick"
    assert results[0]["timestamp"] == "2025-08-14T10:00:00+00:00"
    assert results[0]["model_version"] == "replay"
    assert results[1] == {
        "shippingid": "SHIP-X",
        "uuid": None,
        "errorMsg": "[1004 INVALID_EVENT] decode: field 'productname' must be a non-empty string",
        "code": 1004,
    }
    assert results[2]["code"] == 1301
    assert (results[2]["shippingid"], results[2]["uuid"]) == ("SHIP-3", "uuid-3")
    assert results[3]["code"] == 1004
    assert results[4]["code"] == 1004
    assert "model_outputs" in results[4]["errorMsg"]


def test_replay_records_batches_and_splits_repeated_uuids() -> None:
    # The same uuid twice with different recordings: each line keeps its own outputs.
    lines = [
        _line(1, [_answer()]),
        _line(2, [_answer("Reject", "Red")]),
        _line(1, [_answer("Reject", "Red")]),
    ]
    results = list(replay_records(lines, batch_size=2, clock=lambda: NOW))
    assert [r["ai_decision"] for r in results] == ["Pick", "Not Pick", "Not Pick"]
    assert [r["uuid"] for r in results] == ["uuid-1", "uuid-2", "uuid-1"]


def test_replay_records_rejects_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(replay_records([], batch_size=0))


def test_replay_jsonl_round_trip(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    lines = [
        json.dumps(_line(1, [_answer()])),
        "",
        "{not json",
        json.dumps(_line(2, [INVALID, INVALID])),
    ]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = replay_jsonl(source, tmp_path / "out.jsonl", clock=lambda: NOW)
    assert (summary.total, summary.decided, summary.failed) == (3, 1, 2)
    assert summary.failures_by_code == {"UNDECODABLE_MESSAGE": 1, "MODEL_OUTPUT_INVALID": 1}
    written = [
        json.loads(x) for x in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [w.get("ai_decision", w.get("code")) for w in written] == ["Pick", 1002, 1301]
    assert "line 3 is not JSON" in written[1]["errorMsg"]


def test_join_recorded() -> None:
    events = [_event(1), _event(2), "junk"]
    recorded = [{"uuid": "uuid-2", "model_outputs": ["a", "b"]}, {"uuid": 5}]
    assert list(join_recorded(events, recorded)) == [
        {"request": events[0], "model_outputs": []},
        {"request": events[1], "model_outputs": ["a", "b"]},
        "junk",
    ]


def test_demo_samples_replay_as_documented(tmp_path: Path) -> None:
    samples = REPO / "streams" / "samples"
    events = [json.loads(x) for x in (samples / "pickup_events.jsonl").read_text().splitlines()]
    assert 6 <= len(events) <= 10
    for event in events:
        request = PickupRequest.from_event(event)  # every sample meets the contract
        parse_questions(request.question)
        assert all(
            url.startswith("https://images.example.com/") for url in request.pickupproductimage
        )
    summary = replay_jsonl(
        samples / "pickup_events.jsonl",
        tmp_path / "decisions.jsonl",
        recorded_path=samples / "recorded_outputs.jsonl",
        clock=lambda: NOW,
    )
    results = [json.loads(x) for x in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    got = [
        (r["shippingid"], r.get("ai_decision") or r["code"], r.get("recommendation"))
        for r in results
    ]
    assert got == [
        ("RVP8814201", "Pick", "Accept"),  # clean JSON
        ("RVP8814202", "Not Pick", "Reject"),  # fenced JSON with prose
        ("RVP8814203", "Not Pick", "Partial"),  # single quotes, trailing commas
        ("RVP8814204", "Not Pick", "Retry"),  # retake flags kept
        ("RVP8814205", "Pick", "Accept"),  # invalid first, valid on retry
        ("RVP8814206", 1301, None),  # invalid twice
        ("RVP8814207", "Pick", "Accept"),  # fuzzy labels, trailing commas
        ("RVP8814208", "Not Pick", "Reject"),  # YAML, one question missed
    ]
    assert summary.failures_by_code == {"MODEL_OUTPUT_INVALID": 1}
    retry = results[3]["Question"]
    assert [q["isRetakeImage"] for q in retry] == ["true", "true", "false"]
    missed = results[7]["Question"][1]
    assert (missed["Label"], missed["answer"], missed["Confidence"]) == ("Brand", "", 0.0)
