"""The chat template of an InternVL checkpoint, as its original `model.chat` builds it.

The original InternVL code (`internvl_chat/internvl/conversation.py` and
`InternVLChatModel.chat`) builds every prompt from the conversation template named by
the checkpoint's `config.json` `template`: with the `MPT` separator style and one user
turn, the prompt is

    system_template.format(system_message) + sep + roles[0] + question + sep + roles[1]

and generation stops at `sep.strip()`. `InternVLChatModel` uses `config.system_message`
instead of the template's own when config.json sets one.

`resolve_chat_template` reproduces that choice without running any of the checkpoint's
code: a `conversation.py` in the folder is parsed (Python `ast`, never executed) and the
named template's literal fields are read from its `register_conv_template(Conversation(
...))` call, so a fine-tune with an edited template is honoured; without that file the
template comes from `SUPPORTED_TEMPLATES`, the original templates this project
reproduces. A template that cannot be reproduced is a start-up error
(`ProcessingError(MODEL_NOT_LOADED)`), never a silent fallback.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from processors.errors import ErrorCode, ProcessingError

STAGE = "model"
CONVERSATION_FILE = "conversation.py"
STOP_TOKEN = "<|im_end|>"  # noqa: S105 (a vocabulary token, not a secret)
"""The stop token the engines decode against; a template must end its turns with it."""

TemplateSource = Literal["conversation.py", "builtin", "default"]


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """One original conversation template (the `MPT` separator style, ChatML tokens).

    Attributes:
        name: the template's name (`config.json` `template`).
        system_template: format string with a `{system_message}` field.
        system_message: the system message filled into it.
        roles: the user and assistant role prefixes.
        sep: the separator written after the system prompt and after every message.
        source: where it came from: the checkpoint's `conversation.py`, the built-in
            table, or the default for a checkpoint that names no template (native layout).
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    source: TemplateSource = "builtin"

    def prompt(self, question: str) -> str:
        """The prompt of one user turn and the open assistant turn (`get_prompt()`)."""
        system = self.system_template.format(system_message=self.system_message)
        return system + self.sep + self.roles[0] + question + self.sep + self.roles[1]

    @property
    def stop(self) -> str:
        """The token generation stops at (`sep.strip()`, as `model.chat` uses)."""
        return self.sep.strip()

    def with_system_message(self, system_message: str) -> ChatTemplate:
        """A copy of this template with another system message."""
        return replace(self, system_message=system_message)


INTERNVL2_5 = ChatTemplate(
    name="internvl2_5",
    system_template="<|im_start|>system\n{system_message}",
    system_message=(
        "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
        "联合开发的多模态大语言模型。"
    ),
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep="<|im_end|>\n",
)
"""The `internvl2_5` template (InternVL 2.5 and later), field for field."""

_INTERNVL2_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)
HERMES_2 = ChatTemplate(
    name="Hermes-2",
    system_template="<|im_start|>system\n{system_message}",
    system_message=_INTERNVL2_SYSTEM_MESSAGE,
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep="<|im_end|>",
)
"""The `Hermes-2` template (InternVL 2.0 checkpoints): no newline after `<|im_end|>`."""

INTERNLM2_CHAT = replace(HERMES_2, name="internlm2-chat")
"""The `internlm2-chat` template: at inference, the same prompt as `Hermes-2`."""

SUPPORTED_TEMPLATES: Mapping[str, ChatTemplate] = {
    template.name: template for template in (INTERNVL2_5, HERMES_2, INTERNLM2_CHAT)
}
DEFAULT_TEMPLATE = INTERNVL2_5
"""For a checkpoint whose config names no template (the native layout has none)."""

_FIELDS = ("name", "system_template", "system_message", "roles", "sep", "sep_style")


def _error(message: str) -> ProcessingError:
    return ProcessingError(ErrorCode.MODEL_NOT_LOADED, message, STAGE)


def _literal_fields(call: ast.Call, path: Path) -> dict[str, Any]:
    """The keyword arguments of a `Conversation(...)` call that matter, as Python values."""
    fields: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg not in _FIELDS:
            continue
        value = keyword.value
        if keyword.arg == "sep_style":
            # `SeparatorStyle.MPT` -> "MPT"
            fields["sep_style"] = value.attr if isinstance(value, ast.Attribute) else None
            continue
        try:
            fields[keyword.arg] = ast.literal_eval(value)
        except ValueError as exc:
            raise _error(
                f"{path}: {keyword.arg} of a conversation template is not a literal "
                f"(line {value.lineno}); it cannot be read without running the file"
            ) from exc
    return fields


def parse_conversation_file(path: Path) -> dict[str, dict[str, Any]]:
    """Templates registered in a `conversation.py`: name -> literal fields (not executed).

    Reads every `register_conv_template(Conversation(name=..., ...))` call. Raises
    `ProcessingError(MODEL_NOT_LOADED)` if the file cannot be read or parsed, or if a
    field that matters is not a literal.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise _error(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    templates: dict[str, dict[str, Any]] = {}
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "register_conv_template"
            and node.args
            and isinstance(node.args[0], ast.Call)
        ):
            continue
        fields = _literal_fields(node.args[0], path)
        name = fields.get("name")
        if isinstance(name, str):
            templates[name] = fields
    return templates


def _from_fields(fields: Mapping[str, Any], path: Path) -> ChatTemplate:
    name = str(fields["name"])
    style = fields.get("sep_style", "ADD_COLON_SINGLE")  # the dataclass default
    if style != "MPT":
        raise _error(
            f"{path}: template {name!r} uses the separator style {style!r}; only MPT "
            "(ChatML) templates are reproduced"
        )
    roles = fields.get("roles", ("USER", "ASSISTANT"))
    values = {
        "system_template": fields.get("system_template", "{system_message}"),
        "system_message": fields.get("system_message", ""),
        "sep": fields.get("sep", "\n"),
    }
    if not (
        isinstance(roles, tuple | list)
        and len(roles) == 2
        and all(isinstance(role, str) for role in roles)
        and all(isinstance(value, str) for value in values.values())
    ):
        raise _error(f"{path}: template {name!r} has fields of unexpected types")
    return ChatTemplate(
        name=name,
        system_template=values["system_template"],
        system_message=values["system_message"],
        roles=(roles[0], roles[1]),
        sep=values["sep"],
        source="conversation.py",
    )


def resolve_chat_template(model_path: Path, raw_config: Mapping[str, Any]) -> ChatTemplate:
    """The template the checkpoint's own `model.chat` would use (see the module docstring).

    Order: the `template` named by config.json, looked up in the folder's
    `conversation.py` when there is one, else in `SUPPORTED_TEMPLATES`; a config without
    `template` (the native layout) gets `DEFAULT_TEMPLATE`. A config.json
    `system_message` replaces the template's, as in `InternVLChatModel.__init__`.

    Raises `ProcessingError(MODEL_NOT_LOADED)` when the named template is not in the
    folder's `conversation.py` (nor, without that file, in the table), when it is not
    a literal MPT template, or when its turns do not end with `<|im_end|>`.
    """
    name = raw_config.get("template")
    conversation = model_path / CONVERSATION_FILE
    template: ChatTemplate
    if name is None and "llm_config" not in raw_config:
        template = replace(DEFAULT_TEMPLATE, source="default")
    elif not isinstance(name, str):
        raise _error(
            f"{model_path}/config.json names no chat template (template={name!r}); "
            f"supported: {', '.join(SUPPORTED_TEMPLATES)}"
        )
    elif conversation.is_file():
        found = parse_conversation_file(conversation)
        if name not in found:
            raise _error(
                f"{model_path}/config.json names the chat template {name!r}, which "
                f"{conversation} does not register (it has: {', '.join(found) or 'none'})"
            )
        template = _from_fields(found[name], conversation)
    elif name in SUPPORTED_TEMPLATES:
        template = SUPPORTED_TEMPLATES[name]
    else:
        raise _error(
            f"{model_path}/config.json names the chat template {name!r}, which this project "
            f"does not reproduce (supported: {', '.join(SUPPORTED_TEMPLATES)}); add the "
            f"checkpoint's {CONVERSATION_FILE} to the folder if it defines it"
        )
    if template.stop != STOP_TOKEN:
        raise _error(
            f"{model_path}: chat template {template.name!r} ends its turns with "
            f"{template.stop!r}; the engines stop generation at {STOP_TOKEN}"
        )
    system_message = raw_config.get("system_message")
    if isinstance(system_message, str):
        template = template.with_system_message(system_message)
    return template
