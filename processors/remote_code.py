"""Load an original InternVL checkpoint's own code under transformers 5, files untouched.

The original `InternVLChatModel` files (OpenGVLab/InternVL,
`internvl_chat/internvl/model/internvl_chat/`) were written for transformers 4.37. Two of
their habits break on transformers 5:

- `InternVLChatConfig()` without arguments raises `ValueError("Unsupported
  architecture: ")`: its `llm_config` defaults to `{'architectures': ['']}`. The class
  says so with `is_composition = True`, the attribute transformers 4 checked;
  transformers 5 checks `has_no_defaults_at_init` instead and builds the class without
  arguments when it logs or serializes a config.
- without flash-attn, `InternVLChatModel.__init__` falls back by setting
  `config.llm_config.attn_implementation = 'eager'`; transformers 5 reads
  `_attn_implementation`, so a released `config.json` (whose `llm_config` says
  `attn_implementation: flash_attention_2`) asks for flash attention anyway and the
  language model fails to build with an ImportError.

`load_remote_config` builds the configuration itself and corrects both before the
model is constructed: it marks the config class as having no defaults at init (a class
attribute of the module transformers imported from the folder, in this process only)
and sets the language model's `_attn_implementation` to the attention the engine
resolved. No file of the checkpoint is changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from processors.errors import ErrorCode, ProcessingError

STAGE = "model"


def _error(message: str) -> ProcessingError:
    return ProcessingError(ErrorCode.MODEL_NOT_LOADED, message, STAGE)


def remote_config_class(model_path: Path, raw_config: Mapping[str, Any]) -> Any:
    """The configuration class named by config.json `auto_map.AutoConfig` (imported, local only).

    Importing runs the checkpoint's code: call it only where remote code is trusted.
    Raises `ProcessingError(MODEL_NOT_LOADED)` when config.json names no such class.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    reference = (raw_config.get("auto_map") or {}).get("AutoConfig")
    if not isinstance(reference, str):
        raise _error(f"{model_path}/config.json has no auto_map.AutoConfig for its remote code")
    return get_class_from_dynamic_module(reference, str(model_path), local_files_only=True)


def allow_construction_without_defaults(config_class: Any) -> bool:
    """Mark `config_class` `has_no_defaults_at_init` when it cannot be built without arguments.

    Returns True when the mark was set now. A class that builds fine is left alone, so
    transformers keeps writing only the values that differ from the defaults.
    """
    if getattr(config_class, "has_no_defaults_at_init", False):
        return False
    if not getattr(config_class, "is_composition", False) and _builds_without_arguments(
        config_class
    ):
        return False
    config_class.has_no_defaults_at_init = True
    return True


def _builds_without_arguments(config_class: Any) -> bool:
    try:
        config_class()
    # The checkpoint's own code may raise anything; every failure of this probe means
    # "needs arguments" (the original raises ValueError), real errors surface on loading.
    except Exception:  # noqa: BLE001
        return False
    return True


def load_remote_config(
    model_path: Path, raw_config: Mapping[str, Any], attn_implementation: str
) -> Any:
    """The checkpoint's own config object, ready for `AutoModel.from_pretrained(config=...)`.

    `attn_implementation` ("sdpa", "eager" or "flash_attention_2") becomes the language
    model's `_attn_implementation` (the attribute transformers 5 reads), so the original
    code's flash-attn fallback takes effect. Raises `ProcessingError(MODEL_NOT_LOADED)`
    when config.json names no configuration class; errors of the checkpoint's code
    propagate.
    """
    config_class = remote_config_class(model_path, raw_config)
    allow_construction_without_defaults(config_class)
    config = config_class.from_pretrained(str(model_path), local_files_only=True)
    llm_config = getattr(config, "llm_config", None)
    if llm_config is not None and hasattr(llm_config, "_attn_implementation"):
        # transformers has no public setter on a sub-config; this is the attribute it reads
        llm_config._attn_implementation = attn_implementation  # noqa: SLF001
    return config
