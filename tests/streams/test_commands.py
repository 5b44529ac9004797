"""CLI commands run as real processes: `python -m streams replay` follows its contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, streams_cli
from tests.support.events import pickup_event, tiny_png_b64, valid_answer
from tests.support.tiny_internvl import build_tiny_original_internvl


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


def _check_model(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams", "check-model", "--model-path", str(folder), *extra],
        env={**os.environ, "VS_STATE_DIR": str(folder.parent / "state")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_check_model_passes_on_the_tiny_remote_code_checkpoint(tmp_path: Path) -> None:
    folder = build_tiny_original_internvl(tmp_path / "remote", with_remote_code=True)
    report = tmp_path / "report.json"
    done = _check_model(
        folder, "--requests", "2", "--max-new-tokens", "8", "--no-bf16", "--json", str(report)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reference = remote code model.chat" in done.stdout
    assert "PASS: float32 prompts and greedy ids are equal" in done.stdout
    saved = json.loads(report.read_text())
    assert saved["passed"] is True and [run["dtype"] for run in saved["runs"]] == ["float32"]
    assert len(saved["runs"][0]["requests"]) == 2


def test_check_model_exits_non_zero_on_a_template_mismatch(tmp_path: Path) -> None:
    folder = build_tiny_original_internvl(tmp_path / "planted", with_remote_code=True)
    # The checkpoint's own chat uses a system message its conversation.py does not show.
    modeling = folder / "modeling_internvl_chat.py"
    line = "self.system_message = get_conv_template(self.template).system_message"
    code = modeling.read_text()
    assert line in code
    modeling.write_text(code.replace(line, 'self.system_message = "Be terse."'))
    done = _check_model(folder, "--requests", "1", "--max-new-tokens", "4", "--no-bf16")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "prompts DIFFER" in done.stdout and "FAIL" in done.stdout


def test_check_model_refuses_an_unknown_template_like_a_worker(tmp_path: Path) -> None:
    folder = build_tiny_original_internvl(tmp_path / "unknown")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "template": "vicuna_v1.1"}))
    done = _check_model(folder, "--requests", "1", "--no-bf16")
    assert done.returncode == 2
    assert "MODEL_NOT_LOADED" in done.stdout and "'vicuna_v1.1'" in done.stdout
