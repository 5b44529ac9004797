"""The chat template comes from the checkpoint, with the original InternVL strings.

The expected strings below are copied from OpenGVLab/InternVL
`internvl_chat/internvl/conversation.py` (the `internvl2_5` and `Hermes-2` registrations)
and written out as the prompt `get_conv_template(name).get_prompt()` returns for one user
turn; they are facts about the original, not derived from our code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from processors.chat_templates import (
    SUPPORTED_TEMPLATES,
    parse_conversation_file,
    resolve_chat_template,
)
from processors.errors import ErrorCode, ProcessingError
from processors.internvl import INTERNVL25_SYSTEM_MESSAGE, build_chat_prompt
from tests.support.tiny_internvl import CONVERSATION_CODE, original_config

GENUINE_INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)
GENUINE_INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)


def _folder(tmp_path: Path, config: Mapping[str, object], conversation: str | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if conversation is not None:
        (tmp_path / "conversation.py").write_text(conversation, encoding="utf-8")
    return tmp_path


def test_the_system_message_is_the_genuine_one() -> None:
    assert INTERNVL25_SYSTEM_MESSAGE == GENUINE_INTERNVL2_5_SYSTEM
    assert "多家合作单位" in INTERNVL25_SYSTEM_MESSAGE
    assert "多个合作单位" not in INTERNVL25_SYSTEM_MESSAGE


def test_internvl2_5_prompt_equals_the_original() -> None:
    assert SUPPORTED_TEMPLATES["internvl2_5"].prompt("<image>\nq?") == (
        "<|im_start|>system\n" + GENUINE_INTERNVL2_5_SYSTEM + "<|im_end|>\n"
        "<|im_start|>user\n<image>\nq?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_chat_prompt("q?") == SUPPORTED_TEMPLATES["internvl2_5"].prompt("q?")


def test_hermes_2_and_internlm2_chat_have_no_newline_after_im_end() -> None:
    expected = (
        "<|im_start|>system\n" + GENUINE_INTERNVL2_SYSTEM + "<|im_end|>"
        "<|im_start|>user\nq?<|im_end|><|im_start|>assistant\n"
    )
    assert SUPPORTED_TEMPLATES["Hermes-2"].prompt("q?") == expected
    assert SUPPORTED_TEMPLATES["internlm2-chat"].prompt("q?") == expected


def test_the_template_named_by_config_json_is_used(tmp_path: Path) -> None:
    config = original_config(vocab_size=100, with_remote_code=False)
    config["template"] = "Hermes-2"
    template = resolve_chat_template(_folder(tmp_path, config), config)
    assert template.name == "Hermes-2" and template.source == "builtin"
    assert template.system_message == GENUINE_INTERNVL2_SYSTEM


def test_a_native_checkpoint_without_template_gets_internvl2_5(tmp_path: Path) -> None:
    config = {"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"]}
    template = resolve_chat_template(_folder(tmp_path, config), config)
    assert template.name == "internvl2_5" and template.source == "default"


def test_the_folder_conversation_py_is_read_without_running_it(tmp_path: Path) -> None:
    edited = CONVERSATION_CODE.replace(GENUINE_INTERNVL2_5_SYSTEM, "Du bist ein Prüfer.")
    assert edited != CONVERSATION_CODE
    # Would fail if the file were executed rather than parsed.
    edited = "raise SystemExit('executed')\n" + edited
    config = original_config(vocab_size=100, with_remote_code=True)
    template = resolve_chat_template(_folder(tmp_path, config, edited), config)
    assert template.source == "conversation.py"
    assert template.prompt("q") == (
        "<|im_start|>system\nDu bist ein Prüfer.<|im_end|>\n"
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_stand_in_conversation_py_holds_the_genuine_template(tmp_path: Path) -> None:
    (tmp_path / "conversation.py").write_text(CONVERSATION_CODE, encoding="utf-8")
    fields = parse_conversation_file(tmp_path / "conversation.py")["internvl2_5"]
    assert fields["system_message"] == GENUINE_INTERNVL2_5_SYSTEM
    assert fields["sep"] == "<|im_end|>\n" and fields["sep_style"] == "MPT"


def test_config_json_system_message_replaces_the_templates(tmp_path: Path) -> None:
    config = original_config(vocab_size=100, with_remote_code=False)
    config["system_message"] = "Be brief."
    template = resolve_chat_template(_folder(tmp_path, config), config)
    assert template.prompt("q").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def _refused(tmp_path: Path, config: dict[str, object], conversation: str | None = None) -> str:
    with pytest.raises(ProcessingError) as caught:
        resolve_chat_template(_folder(tmp_path, config, conversation), config)
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    return caught.value.message


def test_unknown_or_missing_templates_are_refused(tmp_path: Path) -> None:
    config = original_config(vocab_size=100, with_remote_code=False)
    config["template"] = "vicuna_v1.1"
    assert "'vicuna_v1.1'" in _refused(tmp_path, config) and "internvl2_5" in _refused(
        tmp_path, config
    )
    del config["template"]
    assert "names no chat template" in _refused(tmp_path, config)


def test_a_conversation_py_without_the_template_is_refused(tmp_path: Path) -> None:
    config = original_config(vocab_size=100, with_remote_code=True)
    config["template"] = "Hermes-2"  # in our table, but not in the folder's file
    assert "does not register" in _refused(tmp_path, config, CONVERSATION_CODE)


def test_templates_that_cannot_be_reproduced_are_refused(tmp_path: Path) -> None:
    config = original_config(vocab_size=100, with_remote_code=True)
    computed = CONVERSATION_CODE.replace('sep="<|im_end|>\\n"', 'sep=END + "\\n"')
    assert computed != CONVERSATION_CODE
    assert "not a literal" in _refused(tmp_path, config, computed)
    colon = CONVERSATION_CODE.replace("SeparatorStyle.MPT,", "SeparatorStyle.ADD_COLON_SINGLE,")
    assert "separator style" in _refused(tmp_path, config, colon)
    other_stop = CONVERSATION_CODE.replace('sep="<|im_end|>\\n"', 'sep="</s>"')
    assert "</s>" in _refused(tmp_path, config, other_stop)
