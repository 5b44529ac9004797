"""InternVL prompts: the chat turn around a question and the expansion of image placeholders.

The prompt convention is `processors.inference`'s: one `<image>` placeholder per image,
expanded into `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, inside
the checkpoint's own chat template (`processors.chat_templates`), exactly as the
original `model.chat`/`batch_chat` build it.
"""

from __future__ import annotations

from collections.abc import Sequence

from processors.chat_templates import DEFAULT_TEMPLATE, INTERNVL2_5, ChatTemplate
from processors.errors import ErrorCode, ProcessingError
from processors.inference import IMAGE_PLACEHOLDER
from processors.internvl.config import STAGE

INTERNVL25_SYSTEM_MESSAGE = INTERNVL2_5.system_message
"""The system message of the original `internvl2_5` conversation template."""

# Vocabulary tokens, not secrets (S105 matches on the word TOKEN).
IMG_START_TOKEN = "<img>"  # noqa: S105
IMG_END_TOKEN = "</img>"  # noqa: S105
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"  # noqa: S105
IM_START_TOKEN = "<|im_start|>"  # noqa: S105
IM_END_TOKEN = "<|im_end|>"  # noqa: S105


def build_chat_prompt(question: str, template: ChatTemplate = DEFAULT_TEMPLATE) -> str:
    r"""One user turn and the open assistant turn, as `get_conv_template(...).get_prompt()`.

    With the default `internvl2_5` template:
    `<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n`
    `<|im_start|>assistant\n`.
    """
    return template.prompt(question)


def expand_image_placeholders(
    prompt: str,
    num_patches: Sequence[int],
    tokens_per_tile: int,
    context_token: str = IMG_CONTEXT_TOKEN,
) -> str:
    """Replace the i-th `<image>` by `<img>` + context x (tokens_per_tile x tiles[i]) + `</img>`.

    Raises:
        ProcessingError: INVALID_REQUEST when the number of placeholders differs from
            `len(num_patches)`, when a tile count is < 1, or when the prompt already holds
            image tokens (they would desynchronise image features and placeholders).
    """
    for token in (IMG_START_TOKEN, IMG_END_TOKEN, context_token):
        if token in prompt:
            raise ProcessingError(
                ErrorCode.INVALID_REQUEST, f"prompt contains the reserved token {token}", STAGE
            )
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(num_patches):
        raise ProcessingError(
            ErrorCode.INVALID_REQUEST,
            f"prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders "
            f"but num_patches lists {len(num_patches)} images",
            STAGE,
        )
    if any(count < 1 for count in num_patches):
        raise ProcessingError(
            ErrorCode.INVALID_REQUEST, f"num_patches must be >= 1 each, got {num_patches}", STAGE
        )
    pieces = [parts[0]]
    for count, rest in zip(num_patches, parts[1:], strict=True):
        pieces.append(IMG_START_TOKEN + context_token * (tokens_per_tile * count) + IMG_END_TOKEN)
        pieces.append(rest)
    return "".join(pieces)
