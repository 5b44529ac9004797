"""CLI commands run as real processes: `python -m streams replay` follows its contract."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import streams_cli
from tests.support.events import pickup_event, tiny_png_b64, valid_answer


def test_replay_follows_the_contract(tmp_path: Path) -> None:
    requests = [pickup_event(n) for n in range(4)]
    lines = [
        {"request": requests[0], "model_outputs": [valid_answer("Accept")]},
        {
            "request": requests[1],
            "model_outputs": ["not json", valid_answer("Reject", colour="No")],
        },
        {"request": requests[2], "model_outputs": ["not json", "still {not json"]},
        {"request": {**requests[3], "question": "[[["}, "model_outputs": [valid_answer()]},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    target = tmp_path / "out.jsonl"

    streams_cli(
        {"VS_STATE_DIR": str(tmp_path / "state")},
        "replay",
        "--input",
        str(source),
        "--output",
        str(target),
    )

    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert [o["shippingid"] for o in out] == [r["shippingid"] for r in requests]
    assert out[0]["ai_decision"] == "Pick" and out[0]["StatusCode"] == 200
    assert out[1]["ai_decision"] == "Not Pick" and out[1]["StatusCode"] == 202
    assert [q["Label"] for q in out[0]["Question"]] == [
        q["Label"] for q in json.loads(requests[0]["question"])
    ]
    assert set(out[2]) == {"shippingid", "uuid", "errorMsg", "code"}
    assert out[2]["code"] == 1301 and out[2]["uuid"] == requests[2]["uuid"]
    assert out[3]["code"] == 1101


def test_replay_gives_a_retake_its_own_key(tmp_path: Path) -> None:
    # The former service's format: no event id and no uuid; the retake has new photos.
    first = {**pickup_event(1), "event_id": "", "uuid": None}
    retake = {**first, "skupickdone": [tiny_png_b64((200, 0, 0))], "previousuuid": "earlier"}
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(
            json.dumps({"request": r, "model_outputs": [valid_answer()]}) + "\n"
            for r in (first, retake, first)
        )
    )
    target = tmp_path / "out.jsonl"
    streams_cli(
        {"VS_STATE_DIR": str(tmp_path / "state")},
        "replay",
        "--input",
        str(source),
        "--output",
        str(target),
    )
    keys = [json.loads(line)["idempotency_key"] for line in target.read_text().splitlines()]
    assert keys[0] != keys[1], "the retake's decision reuses the first request's key"
    assert keys[0] == keys[2], "the same request must keep its key"
