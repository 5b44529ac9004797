"""What both engines share (`processors.internvl.base`): batching, validation, prompt ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.inference import PreparedRequest
from processors.internvl import (
    EngineConfig,
    NativeInternVLEngine,
    build_chat_prompt,
    create_engine,
    expand_image_placeholders,
    load_engine,
)
from tests.processors.internvl.helpers import (
    MAX_NEW,
    load_checkpoint,
    make_request,
)


def test_generate_returns_one_text_per_request(
    native: NativeInternVLEngine, batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    texts = native.generate(batch)
    assert len(texts) == 3
    assert all(isinstance(text, str) and text for text in texts)
    assert all(0 < len(ids) <= MAX_NEW for ids in batched_ids)
    assert len({tuple(ids) for ids in batched_ids}) == 3, "outputs must depend on the input"
    assert native.generate([]) == []


def test_batched_equals_one_at_a_time(
    native: NativeInternVLEngine, batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    singles = [native.generate_token_ids([request])[0] for request in batch]
    assert batched_ids == singles


def test_images_change_the_answer(
    native: NativeInternVLEngine, batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    first = batch[0]
    other = make_request(first.request_id, first.prompt, first.num_patches, seed=99)
    assert native.generate_token_ids([other])[0] != batched_ids[0]


def test_budget_and_chunking(
    checkpoints: dict[str, Path], batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    """Three new tokens, model batches of 2: greedy prefixes of the 8-token answers, in order."""
    engine = load_checkpoint(
        EngineConfig(checkpoints["native"], max_new_tokens=3, max_batch_size=2)
    )
    short = engine.generate_token_ids(batch)
    assert short == [ids[:3] for ids in batched_ids]
    assert all(len(ids) == 3 for ids in short)


def test_placeholder_count_mismatch_is_rejected(native: NativeInternVLEngine) -> None:
    bad = make_request("bad", "<image>\nonly one placeholder", (1, 1), seed=4)
    with pytest.raises(ProcessingError) as caught:
        native.generate([bad])
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "1 <image> placeholders" in caught.value.message
    assert "2 images" in caught.value.message


def test_pixel_values_must_match_tiles(native: NativeInternVLEngine) -> None:
    good = make_request("pix", "<image><image>", (1, 1), seed=5)
    wrong = PreparedRequest("pix", 1, good.prompt, (1, 2), good.pixel_values)
    with pytest.raises(ProcessingError) as caught:
        native.generate([wrong])
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "(3, 3, 448, 448)" in caught.value.message


def test_compact_tokenization_equals_the_expanded_prompt(
    native: NativeInternVLEngine, batch: list[PreparedRequest]
) -> None:
    for request in batch:
        text = build_chat_prompt(
            expand_image_placeholders(request.prompt, request.num_patches, 256),
            native.chat_template,
        )
        assert native.prompt_ids(request) == native.tokenizer(text)["input_ids"]


GENUINE_SYSTEM_PROMPT = (
    "<|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及"
    "多家合作单位联合开发的多模态大语言模型。<|im_end|>\n<|im_start|>user\n"
)
"""The start of every `internvl2_5` prompt (OpenGVLab/InternVL conversation.py)."""


@pytest.mark.parametrize("kind", ["native", "original", "remote"])
def test_prompt_ids_start_with_the_genuine_system_prompt(
    checkpoints: dict[str, Path], batch: list[PreparedRequest], kind: str
) -> None:
    engine = create_engine(EngineConfig(checkpoints[kind], max_new_tokens=MAX_NEW))
    engine.load()
    expected = engine.tokenizer(GENUINE_SYSTEM_PROMPT)["input_ids"]
    assert 104581 in expected  # "多家", the token the earlier string had wrong
    for request in batch:
        assert engine.prompt_ids(request)[: len(expected)] == expected


def test_the_checkpoint_conversation_py_reaches_the_prompt(
    checkpoints: dict[str, Path], tmp_path: Path, batch: list[PreparedRequest]
) -> None:
    folder = shutil.copytree(checkpoints["remote"], tmp_path / "edited")
    conversation = folder / "conversation.py"
    text = conversation.read_text(encoding="utf-8")
    conversation.write_text(text.replace("多家合作单位", "多个合作单位"), encoding="utf-8")
    engine = load_checkpoint(EngineConfig(folder, max_new_tokens=MAX_NEW))
    assert engine.chat_template.source == "conversation.py"
    ids = engine.prompt_ids(batch[0])
    assert 101213 in ids and 104581 not in ids


def test_an_unknown_template_stops_the_engine_at_load(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = shutil.copytree(checkpoints["original"], tmp_path / "unknown-template")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["template"] = "llava-v1"
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(folder))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "'llava-v1'" in caught.value.message and "internvl2_5" in caught.value.message
