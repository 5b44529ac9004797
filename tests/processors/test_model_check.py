"""check-model on the tiny checkpoints in the three layouts, and a planted mismatch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from processors.answer_schema import FieldLimits
from processors.model_check import (
    GENERATE_REFERENCE,
    REMOTE_REFERENCE,
    ModelCheck,
    check_model,
    first_difference,
    load_samples,
)
from processors.model_check_report import format_report
from tests.support.tiny_internvl import TinyCheckpoints

SAMPLE_REQUESTS = Path(__file__).parents[2] / "streams" / "samples" / "check_model.jsonl"
GENUINE_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)
STAND_IN_SYSTEM_LINE = "self.system_message = get_conv_template(self.template).system_message"


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints: TinyCheckpoints) -> dict[str, Path]:
    """The session's tiny checkpoints (shared: the planted test copies the one it changes)."""
    return {
        "native": tiny_checkpoints.native(),
        "original": tiny_checkpoints.original(),
        "remote": tiny_checkpoints.remote(),
    }


def _check(folder: Path, requests: int = 2, bf16: bool = False) -> ModelCheck:
    return check_model(folder, load_samples(SAMPLE_REQUESTS, requests), max_new_tokens=8, bf16=bf16)


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_the_shipped_samples_load_and_a_larger_count_is_refused() -> None:
    samples = load_samples(SAMPLE_REQUESTS, 6)
    assert all(p.is_file() for s in samples for p in (*s.vendor_images, *s.pickup_images))
    with pytest.raises(ValueError, match="holds 6"):
        load_samples(SAMPLE_REQUESTS, 7)


def test_remote_code_checkpoint_agrees_with_its_own_chat(checkpoints: dict[str, Path]) -> None:
    check = _check(checkpoints["remote"], bf16=True)
    assert check.passed
    facts = check.facts
    assert facts.layout == "original (InternVLChatModel), with remote code"
    assert facts.template == "internvl2_5" and facts.template_source == "conversation.py"
    assert facts.system_message == GENUINE_SYSTEM
    assert facts.remote_code and "modeling_internvl_chat.py" in facts.code_files
    assert facts.tokens_per_tile == 256 and facts.vocab_padding == 0
    fp32, bf16 = check.runs
    assert (fp32.dtype, bf16.dtype) == ("float32", "bfloat16")
    assert fp32.reference == REMOTE_REFERENCE
    assert fp32.prompts_equal and fp32.tokens_equal and fp32.decisions_agree
    assert all(r.fast_tokens == r.reference_tokens > 0 for r in fp32.requests)
    assert all(r.reference_s > 0 and r.fast_s > 0 for r in fp32.requests)
    text = format_report(check)
    assert "PASS" in text and GENUINE_SYSTEM in text
    assert check.to_json()["runs"][0]["tokens_equal"] is True


@pytest.mark.parametrize("kind", ["native", "original"])
def test_checkpoints_without_remote_code_are_checked_against_generate(
    checkpoints: dict[str, Path], kind: str
) -> None:
    # One sample: the remote-code test above runs two through the whole comparison.
    check = _check(checkpoints[kind], requests=1)
    assert check.passed
    assert check.runs[0].reference == GENERATE_REFERENCE
    assert not check.facts.remote_code
    assert check.facts.template_source == ("default" if kind == "native" else "builtin")


def test_a_planted_template_mismatch_fails_the_check(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The checkpoint's own chat uses a system message that its template files do not show."""
    folder = shutil.copytree(checkpoints["remote"], tmp_path / "planted")
    modeling = folder / "modeling_internvl_chat.py"
    code = modeling.read_text(encoding="utf-8")
    assert STAND_IN_SYSTEM_LINE in code
    modeling.write_text(
        code.replace(STAND_IN_SYSTEM_LINE, 'self.system_message = "You are a checker."'),
        encoding="utf-8",
    )
    check = _check(folder, requests=1)
    assert not check.passed
    (request,) = check.runs[0].requests
    assert request.prompt_diff is not None
    assert request.prompt_diff.position == 3  # after <|im_start|>, "system", "\n"
    assert request.prompt_diff.reference == repr("You")
    assert "DIFFER at 3" in format_report(check) and "FAIL" in format_report(check)


def test_constrained_answers_are_compared_with_the_free_ones(checkpoints: dict[str, Path]) -> None:
    check = check_model(
        checkpoints["native"],
        load_samples(SAMPLE_REQUESTS, 1),
        max_new_tokens=1200,  # room for the whole constrained answer of the random model
        bf16=False,
        answer_limits=FieldLimits(analysis=4, evidence=4, text_result=3),
    )
    run = check.runs[0]
    request = run.requests[0]
    # The random model's free answer is unreadable; inside the schema it is a decision.
    assert request.fast_decision.startswith("none"), request.fast_decision
    assert request.constrained_decision is not None
    assert not request.constrained_decision.startswith("none"), request.constrained_decision
    assert request.constrained_agrees is False
    assert request.constrained_text_equal is False
    assert run.constrained_agreement == (0, 0, 1)
    assert check.to_json()["runs"][0]["constrained_agreement"] == (0, 0, 1)
    report = format_report(check)
    assert "same decision and answers on 0 of 1 requests, the same text on 0" in report
    # The same constrained request on the slot engine with forced runs (the worker's path).
    assert request.forced_decision is not None
    assert not request.forced_decision.startswith("none"), request.forced_decision
    assert request.forced_agrees is not None and request.forced_text_equal is not None
    assert request.forced_agrees or not request.forced_text_equal  # same text: same decision
    expected = (int(request.forced_agrees), int(request.forced_text_equal), 1)
    assert run.forced_agreement == expected
    assert check.to_json()["runs"][0]["forced_agreement"] == expected
    assert "forced runs (the slot engine) and stepping through the grammar" in report
