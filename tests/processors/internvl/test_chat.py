"""Prompts and image placeholders (`processors.internvl.chat`)."""

from __future__ import annotations

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.internvl import (
    INTERNVL25_SYSTEM_MESSAGE,
    NativeInternVLEngine,
    build_chat_prompt,
    expand_image_placeholders,
)


def test_reserved_tokens_in_prompt_are_rejected() -> None:
    with pytest.raises(ProcessingError) as caught:
        expand_image_placeholders("<image> and <IMG_CONTEXT>", (1,), 4)
    assert caught.value.code == ErrorCode.INVALID_REQUEST


def test_placeholder_expansion_and_template() -> None:
    expanded = expand_image_placeholders("a<image>b<image>c", (2, 1), 2, context_token="C")
    assert expanded == "a<img>CCCC</img>b<img>CC</img>c"
    assert build_chat_prompt("q?") == (
        f"<|im_start|>system\n{INTERNVL25_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\nq?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenized_prompt_holds_256_context_tokens_per_tile(native: NativeInternVLEngine) -> None:
    tokenizer = native.tokenizer
    text = build_chat_prompt(expand_image_placeholders("<image> x <image>", (2, 3), 256))
    ids = tokenizer(text)["input_ids"]
    context_id = native.model.config.image_token_id
    assert ids.count(context_id) == 256 * 5
