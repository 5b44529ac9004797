"""InternVL engines on tiny random checkpoints (CPU): native, converted original, remote code.

All three checkpoint layouts hold the same seeded weights (see
`tests.support.tiny_internvl`), so greedy token ids must agree across engines, and a
batched call must agree with one-at-a-time calls (left padding). Everything is read from
local folders (`local_files_only=True`); no test touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from processors.errors import ErrorCode, ProcessingError
from processors.inference import InferenceEngine, PreparedRequest
from processors.internvl import (
    INTERNVL25_SYSTEM_MESSAGE,
    EngineConfig,
    NativeInternVLEngine,
    RemoteCodeInternVLEngine,
    build_chat_prompt,
    convert_original_state_dict,
    create_engine,
    expand_image_placeholders,
    load_engine,
    patch_projection_as_matmul,
)
from tests.support.tiny_internvl import (
    build_tiny_internvl,
    build_tiny_original_internvl,
    original_config,
)

MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("internvl")
    return {
        "native": build_tiny_internvl(root / "native"),
        "original": build_tiny_original_internvl(root / "original"),
        "remote": build_tiny_original_internvl(root / "remote", with_remote_code=True),
    }


def _load(config: EngineConfig) -> NativeInternVLEngine | RemoteCodeInternVLEngine:
    engine = create_engine(config)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def native(checkpoints: dict[str, Path]) -> NativeInternVLEngine:
    engine = load_engine(EngineConfig(checkpoints["native"], max_new_tokens=MAX_NEW))
    assert isinstance(engine, NativeInternVLEngine)
    return engine


def _request(name: str, prompt: str, patches: tuple[int, ...], seed: int) -> PreparedRequest:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(patches), 3, 448, 448, generator=generator) if patches else None
    return PreparedRequest(name, 1, prompt, patches, pixels)


@pytest.fixture(scope="module")
def batch() -> list[PreparedRequest]:
    """Three requests of different prompt lengths and tile counts (so rows get padded)."""
    return [
        _request("short", "<image>\nDescribe the product.", (1,), seed=1),
        _request(
            "long",
            "Vendor image: <image>\nPickup images: <image>\n"
            "Compare the pickup with the vendor listing and answer in JSON with the fields "
            "image_analysis, verification_results and pickup_confidence.",
            (1, 2),
            seed=2,
        ),
        _request("three", "<image><image><image> Same item?", (1, 1, 1), seed=3),
    ]


@pytest.fixture(scope="module")
def batched_ids(native: NativeInternVLEngine, batch: list[PreparedRequest]) -> list[list[int]]:
    return native.generate_token_ids(batch)


def test_factory_loads_native_checkpoint(native: InferenceEngine) -> None:
    assert isinstance(native, NativeInternVLEngine)
    assert isinstance(native, InferenceEngine)
    assert native.converted_from_original is False
    assert native.device == "cpu" and native.dtype == torch.float32
    assert native.attn_implementation == "sdpa"
    assert native.tokens_per_tile == 256  # (448 // 14)^2 * 0.5^2
    assert native.model_version.startswith("internvl-native:native:")
    assert native.model_version != "internvl-native:native:not-loaded"


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
    other = _request(first.request_id, first.prompt, first.num_patches, seed=99)
    assert native.generate_token_ids([other])[0] != batched_ids[0]


def test_budget_and_chunking(
    checkpoints: dict[str, Path], batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    """Three new tokens, model batches of 2: greedy prefixes of the 8-token answers, in order."""
    engine = _load(EngineConfig(checkpoints["native"], max_new_tokens=3, max_batch_size=2))
    short = engine.generate_token_ids(batch)
    assert short == [ids[:3] for ids in batched_ids]
    assert all(len(ids) == 3 for ids in short)


def test_converted_original_checkpoint_matches_native(
    checkpoints: dict[str, Path], batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    engine = _load(EngineConfig(checkpoints["original"], max_new_tokens=MAX_NEW))
    assert isinstance(engine, NativeInternVLEngine)
    assert engine.converted_from_original is True
    assert engine.generate_token_ids(batch) == batched_ids


def test_remote_code_engine_matches_native(
    checkpoints: dict[str, Path],
    native: NativeInternVLEngine,
    batch: list[PreparedRequest],
    batched_ids: list[list[int]],
) -> None:
    """The original-format forward (stand-in remote code) agrees with the converted native one."""
    config = EngineConfig(checkpoints["remote"], max_new_tokens=MAX_NEW, format="remote-code")
    engine = _load(config)
    assert isinstance(engine, RemoteCodeInternVLEngine)
    assert engine.model_version.startswith("internvl-remote-code:remote:")
    assert engine.generate_token_ids(batch) == batched_ids
    assert engine.generate(batch[:1]) == native.generate(batch[:1])


def test_auto_prefers_native_conversion_for_original_with_code(
    checkpoints: dict[str, Path],
) -> None:
    """A convertible original checkpoint is served natively even when it carries code."""
    engine = create_engine(EngineConfig(checkpoints["remote"]))
    assert isinstance(engine, NativeInternVLEngine)
    assert not engine.loaded


def test_placeholder_count_mismatch_is_rejected(native: NativeInternVLEngine) -> None:
    bad = _request("bad", "<image>\nonly one placeholder", (1, 1), seed=4)
    with pytest.raises(ProcessingError) as caught:
        native.generate([bad])
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "1 <image> placeholders" in caught.value.message
    assert "2 images" in caught.value.message


def test_pixel_values_must_match_tiles(native: NativeInternVLEngine) -> None:
    good = _request("pix", "<image><image>", (1, 1), seed=5)
    wrong = PreparedRequest("pix", 1, good.prompt, (1, 2), good.pixel_values)
    with pytest.raises(ProcessingError) as caught:
        native.generate([wrong])
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert "(3, 3, 448, 448)" in caught.value.message


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
    tokenizer = native._tokenizer
    text = build_chat_prompt(expand_image_placeholders("<image> x <image>", (2, 3), 256))
    ids = tokenizer(text)["input_ids"]
    context_id = native._model.config.image_token_id
    assert ids.count(context_id) == 256 * 5


def test_missing_folder_is_model_not_loaded(tmp_path: Path) -> None:
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(tmp_path / "nowhere"))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "does not exist" in caught.value.message


def test_missing_weights_is_model_not_loaded(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("native", "original"):
        folder = tmp_path / kind
        shutil.copytree(checkpoints[kind], folder, ignore=shutil.ignore_patterns("*.safetensors"))
        with pytest.raises(ProcessingError) as caught:
            load_engine(EngineConfig(folder))
        assert caught.value.code == ErrorCode.MODEL_NOT_LOADED


def test_unsupported_checkpoints_are_model_not_loaded(tmp_path: Path) -> None:
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(other))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "unsupported checkpoint" in caught.value.message

    internlm = tmp_path / "internlm"
    internlm.mkdir()
    config = original_config(vocab_size=100, with_remote_code=False)
    config["llm_config"]["architectures"] = ["InternLM2ForCausalLM"]
    (internlm / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(internlm))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "no modeling code" in caught.value.message


def test_remote_code_format_needs_code(checkpoints: dict[str, Path]) -> None:
    for kind in ("native", "original"):
        with pytest.raises(ProcessingError) as caught:
            load_engine(EngineConfig(checkpoints[kind], format="remote-code"))
        assert caught.value.code == ErrorCode.MODEL_NOT_LOADED


def test_unknown_original_weight_is_refused() -> None:
    tensor = torch.zeros(2)
    assert set(convert_original_state_dict({"mlp1.1.bias": tensor})) == {
        "model.multi_modal_projector.linear_1.bias"
    }
    with pytest.raises(ProcessingError) as caught:
        convert_original_state_dict({"language_model.base_model.lora_A.weight": tensor})
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED


def test_qkv_is_split_in_row_order() -> None:
    qkv = torch.arange(12.0).reshape(6, 2)
    out = convert_original_state_dict({"vision_model.encoder.layers.3.attn.qkv.weight": qkv})
    prefix = "model.vision_tower.encoder.layer.3.attention."
    assert torch.equal(out[prefix + "q_proj.weight"], qkv[0:2])
    assert torch.equal(out[prefix + "k_proj.weight"], qkv[2:4])
    assert torch.equal(out[prefix + "v_proj.weight"], qkv[4:6])


def test_not_loaded_and_config_validation(tmp_path: Path) -> None:
    engine = NativeInternVLEngine(EngineConfig(tmp_path))
    assert engine.model_version.endswith(":not-loaded")
    with pytest.raises(ProcessingError) as caught:
        engine.generate([_request("x", "<image>", (1,), seed=6)])
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    with pytest.raises(ValueError):
        EngineConfig(tmp_path, format="onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        EngineConfig(tmp_path, max_batch_size=0)
    with pytest.raises(ValueError):
        EngineConfig(tmp_path, device="tpu")
    with pytest.raises(ValueError, match="decode_attention"):
        EngineConfig(tmp_path, decode_attention="flash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention_splits"):
        EngineConfig(tmp_path, attention_splits=0)


def test_split_attention_needs_cuda(checkpoints: dict[str, Path]) -> None:
    """Asked for explicitly on a CPU, the split-key kernel is a start-up error; auto is SDPA."""
    with pytest.raises(ProcessingError) as caught:
        load_engine(EngineConfig(checkpoints["native"], decode_attention="split"))
    assert caught.value.code == ErrorCode.MODEL_NOT_LOADED
    assert "CUDA" in caught.value.message
    engine = load_engine(EngineConfig(checkpoints["native"]))
    assert isinstance(engine, NativeInternVLEngine) and engine._decoder is not None
    assert not engine._decoder.split_attention


def test_patch_projection_as_matmul_equals_the_convolution() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)
    pixels = torch.randn(2, 3, 56, 42)
    expected = conv(pixels)
    assert patch_projection_as_matmul(conv)
    out = conv(pixels)
    assert out.shape == expected.shape == (2, 8, 4, 3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert set(conv.state_dict()) == {"weight", "bias"}  # checkpoints still load
    overlapping = torch.nn.Conv2d(3, 8, kernel_size=3, stride=1, padding=1)
    assert not patch_projection_as_matmul(overlapping)
    assert "forward" not in vars(overlapping)


# ------------------------------------------------------------ static fast decode path


def _generate_engine(path: Path, **overrides: object) -> NativeInternVLEngine:
    engine = load_engine(EngineConfig(path, decode="generate", **overrides))  # type: ignore[arg-type]
    assert isinstance(engine, NativeInternVLEngine)
    return engine


def test_static_path_is_the_default(native: NativeInternVLEngine) -> None:
    assert native._decoder is not None
    assert native.feature_cache is not None
    native.generate_token_ids([_request("t", "<image> hi", (1,), seed=9)])
    assert native.timings["decode"] > 0 and native.timings["prefill"] > 0


@pytest.mark.parametrize(("min_new", "max_batch"), [(0, 32), (12, 32), (0, 1)])
def test_static_decode_matches_generate(
    checkpoints: dict[str, Path], batch: list[PreparedRequest], min_new: int, max_batch: int
) -> None:
    """Greedy ids of the static path equal `generate`, batched or one at a time."""
    common = {"max_new_tokens": 12, "min_new_tokens": min_new}
    reference = _generate_engine(checkpoints["native"], max_batch_size=1, **common)
    expected = [reference.generate_token_ids([request])[0] for request in batch]
    fast = load_engine(
        EngineConfig(
            checkpoints["native"],
            max_batch_size=max_batch,  # 1: three chunks, pipelined
            prefill_batch_size=2,  # two prefill sub-batches in one decode session
            vision_batch_tiles=2,
            cache_length_bucket=64,
            **common,  # type: ignore[arg-type]
        )
    )
    assert isinstance(fast, NativeInternVLEngine) and fast._decoder is not None
    assert fast.generate_token_ids(batch) == expected
    assert [fast.generate_token_ids([request])[0] for request in batch] == expected
    if min_new:
        assert all(len(ids) == 12 for ids in expected)


def test_feature_cache_reuses_vendor_features(checkpoints: dict[str, Path]) -> None:
    vendor = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(5))
    requests = []
    for index in range(3):
        pickup = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(10 + index))
        requests.append(
            PreparedRequest(
                f"r{index}", 1, "<image> vs <image>?", (1, 2), torch.cat([vendor, pickup])
            )
        )
    reference = _generate_engine(checkpoints["native"], max_new_tokens=MAX_NEW)
    expected = [reference.generate_token_ids([request])[0] for request in requests]
    engine = load_engine(EngineConfig(checkpoints["native"], max_new_tokens=MAX_NEW))
    assert isinstance(engine, NativeInternVLEngine)
    cache = engine.feature_cache
    assert cache is not None
    assert engine.generate_token_ids(requests[:1]) == expected[:1]
    assert len(cache) == 1 and cache.hits == 0
    assert engine.generate_token_ids(requests) == expected
    assert cache.hits == 3 and len(cache) == 1  # only the first image is a candidate


def test_feature_cache_is_memory_bounded() -> None:
    from processors.internvl import FeatureCache, content_key

    cache = FeatureCache(max_bytes=3 * 4 * 10)
    for index in range(5):
        cache.put(f"k{index}", torch.zeros(10))
    assert len(cache) == 3 and cache.bytes == 120
    assert cache.get("k0") is None and cache.get("k4") is not None
    same = content_key(torch.ones(1, 3, 4, 4))
    assert same == content_key(torch.ones(1, 3, 4, 4))
    assert same != content_key(torch.ones(1, 3, 4, 4) * 2)


def test_from_model_wraps_an_in_memory_model(
    native: NativeInternVLEngine, batch: list[PreparedRequest], batched_ids: list[list[int]]
) -> None:
    wrapped = NativeInternVLEngine.from_model(
        EngineConfig("bench-model", max_new_tokens=MAX_NEW), native._model, native._tokenizer
    )
    assert wrapped.loaded and wrapped.model_version == "internvl-native:bench-model:in-memory"
    assert wrapped.generate_token_ids(batch) == batched_ids


def test_compact_tokenization_equals_the_expanded_prompt(
    native: NativeInternVLEngine, batch: list[PreparedRequest]
) -> None:
    for request in batch:
        text = build_chat_prompt(
            expand_image_placeholders(request.prompt, request.num_patches, 256),
            native.chat_template,
        )
        assert native._encode(request) == native._tokenizer(text)["input_ids"]


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
    expected = engine._tokenizer(GENUINE_SYSTEM_PROMPT)["input_ids"]
    assert 104581 in expected  # "多家", the token the earlier string had wrong
    for request in batch:
        assert engine._encode(request)[: len(expected)] == expected


def test_the_checkpoint_conversation_py_reaches_the_prompt(
    checkpoints: dict[str, Path], tmp_path: Path, batch: list[PreparedRequest]
) -> None:
    folder = shutil.copytree(checkpoints["remote"], tmp_path / "edited")
    conversation = folder / "conversation.py"
    text = conversation.read_text(encoding="utf-8")
    conversation.write_text(text.replace("多家合作单位", "多个合作单位"), encoding="utf-8")
    engine = _load(EngineConfig(folder, max_new_tokens=MAX_NEW))
    assert engine.chat_template.source == "conversation.py"
    ids = engine._encode(batch[0])
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
