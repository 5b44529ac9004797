"""CLI commands run as real processes: `python -m streams replay` follows its contract."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import streams_cli
from tests.support.events import pickup_event, valid_answer


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
