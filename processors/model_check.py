"""Pre-flight check of an InternVL checkpoint: does the fast engine answer as the original?

`check_model` loads a checkpoint folder, states its facts (`CheckpointFacts`), then runs
sample verification requests (prompt built and images tiled exactly as the worker does)
through two paths and compares them request by request:

- the **reference**: the checkpoint's own remote code through its `model.chat` (the
  call the original service made) when the folder carries that code; otherwise the same
  weights through transformers' `generate` (`decode="generate"`), with the prompt built
  as one string from the chat template and tokenized in one call, as `model.chat` does;
- the **fast** path: the engine the worker serves (`create_engine`, format "auto").

Per request it reports whether the prompt ids are equal (else the first differing
position, both tokens decoded), whether the greedy ids are equal (else the first
divergence), whether the decisions agree (`ai_decision` and every answer, or both
unreadable), and the seconds each path took. The exactness check runs in float32; a
second run in bfloat16, as served on a GPU, is reported but does not decide the result,
because different kernels in bfloat16 legitimately drift on long answers.
`ModelCheck.passed` is False when a float32 prompt or greedy sequence differs.

When the fast engine decodes inside each request's answer schema (the InternVL engines,
`constrained_decoding` on), each request also runs constrained on the fast engine, and
the report says how often the constrained and the free greedy answers lead to the same
decision and answers, and how often their texts are identical: on a real checkpoint the
two agree wherever the model's own choice is inside the schema. Each constrained request
also runs on the slot engine with forced runs (what the worker serves by default: the
tokens the grammar forces are fed as xgrammar splits them, which may differ from the
split the model would choose), and the report says how often that answer gives the same
decision and answers, and the same text, as stepping through the grammar token by token.
Neither comparison decides the verdict.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processors.answer_parsing import parse_answer
from processors.answer_schema import FieldLimits, answer_schema
from processors.chat_templates import resolve_chat_template
from processors.errors import ErrorCode, ProcessingError
from processors.gathering import GatheredImages, GatherLimits, decode_image
from processors.inference import PreparedRequest
from processors.internvl import (
    EngineConfig,
    NativeInternVLEngine,
    RemoteCodeInternVLEngine,
    build_chat_prompt,
    checkpoint_kind,
    create_engine,
    expand_image_placeholders,
    has_remote_code,
    read_checkpoint_config,
)
from processors.prompt import build_prompt, parse_questions
from processors.records import PickupRequest
from processors.slot_engine import SlotEngine, SlotEngineConfig
from processors.tiling import TilingConfig, tile_images

Engine = NativeInternVLEngine | RemoteCodeInternVLEngine
REMOTE_REFERENCE = "remote code model.chat"
GENERATE_REFERENCE = "transformers generate (no remote code in the folder)"


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One sample verification request: a product, its questions and local image files."""

    name: str
    productname: str
    question: str
    vendor_images: tuple[Path, ...]
    pickup_images: tuple[Path, ...]


def load_samples(path: Path, limit: int) -> list[SampleRequest]:
    """The first `limit` requests of a JSON-lines sample file; image paths are relative to it.

    Raises `ValueError` naming the line when a line is malformed or an image is missing,
    and when `limit` is below 1 or above the number of requests in the file.
    """
    samples: list[SampleRequest] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            sample = SampleRequest(
                name=str(row["name"]),
                productname=str(row["productname"]),
                question=str(row["question"]),
                vendor_images=tuple(path.parent / str(p) for p in row["vendor_images"]),
                pickup_images=tuple(path.parent / str(p) for p in row["pickup_images"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a sample request: {exc}") from exc
        missing = [p for p in (*sample.vendor_images, *sample.pickup_images) if not p.is_file()]
        if missing:
            raise ValueError(f"{path}:{number}: missing image {missing[0]}")
        samples.append(sample)
    if limit < 1 or limit > len(samples):
        raise ValueError(f"{path} holds {len(samples)} sample requests; asked for {limit}")
    return samples[:limit]


@dataclass(frozen=True, slots=True)
class PreparedSample:
    """A sample as the worker would hand it to the engine, plus what `decide` needs."""

    request: PreparedRequest
    pickup: PickupRequest
    questions: list[dict[str, Any]]


def prepare_sample(sample: SampleRequest, tiling: TilingConfig) -> PreparedSample:
    """Decode, tile and prompt one sample with the worker's own functions."""
    limits = GatherLimits()
    vendor = tuple(decode_image(p.read_bytes(), limits) for p in sample.vendor_images)
    pickup = tuple(decode_image(p.read_bytes(), limits) for p in sample.pickup_images)
    tiled = tile_images(GatheredImages(vendor, pickup, 0.0), tiling)
    questions = parse_questions(sample.question)
    prompt = build_prompt(sample.productname, questions, tiled.vendor_count, tiled.pickup_count)
    event = {
        "shippingid": sample.name,
        "productname": sample.productname,
        "question": sample.question,
        "pickupproductimage": [str(p) for p in sample.vendor_images],
        "skupickdone": [str(p) for p in sample.pickup_images],
    }
    return PreparedSample(
        PreparedRequest(sample.name, 1, prompt, tiled.num_patches, tiled.pixel_values),
        PickupRequest.from_event(event),
        questions,
    )


# ----------------------------------------------------------------------------- reports


@dataclass(frozen=True, slots=True)
class TokenDiff:
    """The first position where two id sequences differ; "<end>" where one had ended."""

    position: int
    reference: str
    fast: str


@dataclass(frozen=True, slots=True)
class RequestCheck:
    """One request through both paths."""

    name: str
    prompt_tokens: int
    prompt_diff: TokenDiff | None
    reference_tokens: int
    fast_tokens: int
    token_diff: TokenDiff | None
    reference_decision: str
    fast_decision: str
    decisions_agree: bool
    reference_s: float
    fast_s: float
    # The fast engine decoding inside the answer schema (None: the engine does not).
    constrained_decision: str | None = None
    constrained_agrees: bool | None = None  # same decision and answers as the free answer
    constrained_text_equal: bool | None = None
    constrained_s: float | None = None
    # The same constrained request on the slot engine with forced runs, against stepping.
    forced_decision: str | None = None
    forced_agrees: bool | None = None
    forced_text_equal: bool | None = None
    forced_s: float | None = None

    @property
    def prompt_equal(self) -> bool:
        """Whether both paths built the same prompt ids."""
        return self.prompt_diff is None

    @property
    def tokens_equal(self) -> bool:
        """Whether both paths generated the same greedy ids."""
        return self.token_diff is None


@dataclass(frozen=True, slots=True)
class PrecisionRun:
    """All requests in one dtype."""

    dtype: str
    reference: str
    fast: str
    requests: tuple[RequestCheck, ...]

    @property
    def prompts_equal(self) -> bool:
        """Whether every request's prompt ids are equal on both paths."""
        return all(r.prompt_equal for r in self.requests)

    @property
    def tokens_equal(self) -> bool:
        """Whether every request's greedy ids are equal on both paths."""
        return all(r.tokens_equal for r in self.requests)

    @property
    def decisions_agree(self) -> bool:
        """Whether every request leads to the same decision on both paths."""
        return all(r.decisions_agree for r in self.requests)

    @property
    def constrained_agreement(self) -> tuple[int, int, int] | None:
        """(same decision and answers, identical text, compared) of constrained vs free."""
        return _agreement((r.constrained_agrees, r.constrained_text_equal) for r in self.requests)

    @property
    def forced_agreement(self) -> tuple[int, int, int] | None:
        """(same decision and answers, identical text, compared) of forced runs vs stepping."""
        return _agreement((r.forced_agrees, r.forced_text_equal) for r in self.requests)


def _agreement(
    outcomes: Iterable[tuple[bool | None, bool | None]],
) -> tuple[int, int, int] | None:
    """(agreeing, identical, compared) over (agrees, text equal) pairs; None: none compared."""
    compared = [(agrees, equal) for agrees, equal in outcomes if agrees is not None]
    if not compared:
        return None
    agree = sum(1 for agrees, _ in compared if agrees)
    identical = sum(1 for _, equal in compared if equal)
    return agree, identical, len(compared)


@dataclass(frozen=True, slots=True)
class CheckpointFacts:
    """What the folder holds and how the worker would serve it."""

    model_path: str
    layout: str
    engine: str
    template: str
    template_source: str
    system_message: str
    checkpoint_dtype: str
    tokenizer_size: int
    model_vocab_size: int
    vocab_padding: int
    image_size: int
    tokens_per_tile: int
    checkpoint_tiles: str
    served_tiles: str
    remote_code: bool
    code_files: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ModelCheck:
    """The checkpoint's facts and one run per dtype; `passed` is the verdict."""

    facts: CheckpointFacts
    runs: tuple[PrecisionRun, ...]

    @property
    def passed(self) -> bool:
        """True when every float32 prompt and greedy sequence is equal on both paths."""
        exact = [run for run in self.runs if run.dtype == "float32"]
        return bool(exact) and all(run.prompts_equal and run.tokens_equal for run in exact)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values, with the derived verdicts of every run."""
        out = asdict(self)
        out["passed"] = self.passed
        for run, raw in zip(self.runs, out["runs"], strict=True):
            raw["prompts_equal"] = run.prompts_equal
            raw["tokens_equal"] = run.tokens_equal
            raw["decisions_agree"] = run.decisions_agree
            raw["constrained_agreement"] = run.constrained_agreement
            raw["forced_agreement"] = run.forced_agreement
        return out


# ------------------------------------------------------------------------------- logic


def first_difference(reference: Sequence[int], fast: Sequence[int]) -> int | None:
    """Index of the first differing id (or the shorter length); None when equal."""
    for index, (a, b) in enumerate(zip(reference, fast, strict=False)):
        if a != b:
            return index
    return None if len(reference) == len(fast) else min(len(reference), len(fast))


def token_diff(tokenizer: Any, reference: Sequence[int], fast: Sequence[int]) -> TokenDiff | None:
    """Where two id sequences first differ, with each side's token there; None when equal."""
    position = first_difference(reference, fast)
    if position is None:
        return None

    def shown(ids: Sequence[int]) -> str:
        return repr(tokenizer.decode([ids[position]])) if position < len(ids) else "<end>"

    return TokenDiff(position, shown(reference), shown(fast))


def decision_of(sample: PreparedSample, text: str) -> tuple[str, tuple[Any, ...] | None]:
    """A readable summary of the decision an answer leads to, and a comparable key."""
    from processors.decision import decide

    parsed = parse_answer(text)
    if parsed.answer is None:
        return f"none (unreadable answer: {parsed.error[:80]})", None
    try:
        decision = decide(
            sample.pickup,
            sample.questions,
            parsed.answer,
            model_version="check-model",
            processing_time_ai=0.0,
            total_time=0.0,
            source=None,
            now=datetime.now(UTC),
        )
    except ProcessingError as exc:
        return f"none ({exc.code.name}: {exc.message[:80]})", (exc.code.name,)
    answers = tuple((q.label, q.answer) for q in decision.questions)
    summary = f"{decision.ai_decision}; " + ", ".join(f"{label}={a}" for label, a in answers)
    return summary, (decision.ai_decision, answers)


def _chat_reference(
    engine: RemoteCodeInternVLEngine, sample: PreparedSample
) -> tuple[list[int], list[int], str]:
    """Prompt ids, new ids (cut at the stop token) and answer of the checkpoint's `chat`.

    `model.generate` is wrapped on the instance for the call to record what `chat` feeds
    it; the checkpoint's code is otherwise untouched.
    """
    import torch

    model, request = engine.model, sample.request
    seen: dict[str, list[int]] = {}
    original = model.generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen["prompt"] = kwargs["input_ids"][0].tolist()
        output = original(*args, **kwargs)
        seen["new"] = output[0].tolist()
        return output

    pixels = request.pixel_values.to(device=engine.device, dtype=engine.dtype)
    model.generate = recording
    try:
        with torch.inference_mode():
            text = model.chat(
                engine.tokenizer,
                pixels,
                request.prompt,
                {"max_new_tokens": engine.config.max_new_tokens, "do_sample": False},
                num_patches_list=list(request.num_patches),
            )
    finally:
        del model.generate
    stop = engine.tokenizer.convert_tokens_to_ids(engine.chat_template.stop)
    new = seen["new"]
    return seen["prompt"], new[: new.index(stop)] if stop in new else new, str(text)


def _template_prompt_ids(engine: Engine, request: PreparedRequest) -> list[int]:
    text = build_chat_prompt(
        expand_image_placeholders(request.prompt, request.num_patches, engine.tokens_per_tile),
        engine.chat_template,
    )
    return list(engine.tokenizer(text)["input_ids"])


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started


def _describe(engine: Engine) -> str:
    if isinstance(engine, RemoteCodeInternVLEngine):
        return "remote code (RemoteCodeInternVLEngine: the original forward, batched)"
    converted = " converted from the original layout" if engine.converted_from_original else ""
    decode = "generate" if engine.config.decode == "generate" else "static-cache"
    return f"native engine{converted} ({decode} greedy decode)"


def run_precision(
    model_path: Path,
    samples: Sequence[SampleRequest],
    *,
    dtype: str,
    device: str,
    max_new_tokens: int,
    progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, _: items,
    answer_limits: FieldLimits | None = None,
) -> tuple[PrecisionRun, Engine]:
    """Both paths over `samples` in `dtype`; returns the run and the fast engine (loaded).

    `answer_limits` bound the free strings of the constrained runs' answer schemas.
    """
    common: dict[str, Any] = {"device": device, "dtype": dtype, "max_new_tokens": max_new_tokens}
    raw_config = read_checkpoint_config(model_path)
    fast = create_engine(EngineConfig(model_path, **common))
    fast.load()
    remote = checkpoint_kind(raw_config) == "original" and has_remote_code(model_path, raw_config)
    reference: Engine
    if remote and isinstance(fast, RemoteCodeInternVLEngine):
        reference = fast
    elif remote:
        reference = RemoteCodeInternVLEngine(
            EngineConfig(model_path, format="remote-code", **common)
        )
        reference.load()
    else:
        reference = create_engine(EngineConfig(model_path, decode="generate", **common))
        reference.load()
    tiling = TilingConfig(image_size=fast.image_size)
    checks: list[RequestCheck] = []
    slot = _forced_engine(fast)
    try:
        for sample in progress(samples, f"{dtype} requests"):
            checks.append(_check_request(sample, tiling, reference, fast, slot, answer_limits))
    finally:
        if slot is not None:
            slot.close()
    label = (
        REMOTE_REFERENCE
        if isinstance(reference, RemoteCodeInternVLEngine)
        else (GENERATE_REFERENCE)
    )
    return PrecisionRun(dtype, label, _describe(fast), tuple(checks)), fast


def _forced_engine(fast: Engine) -> SlotEngine | None:
    """A two-slot engine with forced runs over the loaded fast engine (None: not constrained)."""
    if not isinstance(fast, NativeInternVLEngine) or not fast.config.constrained_decoding:
        return None
    slot = SlotEngine(fast, SlotEngineConfig(slots=2, queue_size=2))
    slot.load()
    return slot


def _check_request(
    sample: SampleRequest,
    tiling: TilingConfig,
    reference: Engine,
    fast: Engine,
    slot: SlotEngine | None,
    answer_limits: FieldLimits | None,
) -> RequestCheck:
    """One sample through the reference, the fast path and (if on) the constrained paths."""
    prepared = prepare_sample(sample, tiling)
    request = prepared.request
    if isinstance(reference, RemoteCodeInternVLEngine):
        (ref_prompt, ref_ids, ref_text), ref_s = _timed(
            lambda: _chat_reference(reference, prepared)
        )
    else:
        ref_prompt = _template_prompt_ids(reference, request)
        ref_ids_all, ref_s = _timed(lambda: reference.generate_token_ids([request]))
        ref_ids = ref_ids_all[0]
        ref_text = reference.tokenizer.decode(ref_ids, skip_special_tokens=True).strip()
    fast_ids_all, fast_s = _timed(lambda: fast.generate_token_ids([request]))
    fast_ids = fast_ids_all[0]
    fast_text = fast.tokenizer.decode(fast_ids, skip_special_tokens=True).strip()
    ref_summary, ref_key = decision_of(prepared, ref_text)
    fast_summary, fast_key = decision_of(prepared, fast_text)
    constrained = _constrained_check(fast, prepared, fast_text, fast_key, answer_limits, slot)
    return RequestCheck(
        name=sample.name,
        prompt_tokens=len(ref_prompt),
        prompt_diff=token_diff(fast.tokenizer, ref_prompt, fast.prompt_ids(request)),
        reference_tokens=len(ref_ids),
        fast_tokens=len(fast_ids),
        token_diff=token_diff(fast.tokenizer, ref_ids, fast_ids),
        reference_decision=ref_summary,
        fast_decision=fast_summary,
        decisions_agree=ref_key == fast_key,
        reference_s=ref_s,
        fast_s=fast_s,
        **constrained,
    )


def _constrained_check(
    fast: Engine,
    prepared: PreparedSample,
    free_text: str,
    free_key: tuple[Any, ...] | None,
    limits: FieldLimits | None,
    slot: SlotEngine | None,
) -> dict[str, Any]:
    """The request decoded inside its answer schema, against the free answer ({} if off).

    With `slot`, the same request also runs there with forced runs, against stepping.
    """
    if not isinstance(fast, NativeInternVLEngine) or not fast.config.constrained_decoding:
        return {}
    schema = answer_schema(prepared.questions, limits or FieldLimits())
    request = replace(prepared.request, answer_schema=schema)
    ids_all, seconds = _timed(lambda: fast.generate_token_ids([request]))
    text = fast.tokenizer.decode(ids_all[0], skip_special_tokens=True).strip()
    summary, key = decision_of(prepared, text)
    out: dict[str, Any] = {
        "constrained_decision": summary,
        "constrained_agrees": key == free_key,
        "constrained_text_equal": text == free_text,
        "constrained_s": seconds,
    }
    if slot is not None:
        completion, forced_s = _timed(lambda: slot.submit(request).result())
        forced_text = str(completion.text).strip()
        forced_summary, forced_key = decision_of(prepared, forced_text)
        out.update(
            forced_decision=forced_summary,
            forced_agrees=forced_key == key,
            forced_text_equal=forced_text == text,
            forced_s=forced_s,
        )
    return out


def checkpoint_facts(model_path: Path, engine: Engine) -> CheckpointFacts:
    """The facts of a folder, read from its files and from the loaded fast engine."""
    raw = read_checkpoint_config(model_path)
    kind = checkpoint_kind(raw)
    remote = kind == "original" and has_remote_code(model_path, raw)
    template = resolve_chat_template(model_path, raw)
    text = raw.get("llm_config") or raw.get("text_config") or {}
    dtype = raw.get("torch_dtype") or raw.get("dtype") or text.get("torch_dtype") or "unset"
    model_vocab = int(text.get("vocab_size") or 0)
    tokenizer_size = len(engine.tokenizer)
    layout = (
        "native (InternVLForConditionalGeneration)"
        if kind == "native"
        else ("original (InternVLChatModel), " + ("with" if remote else "without") + " remote code")
    )
    if kind == "original":
        thumbnail = "with" if raw.get("use_thumbnail") else "without"
        checkpoint_tiles = (
            f"{raw.get('min_dynamic_patch', 1)}..{raw.get('max_dynamic_patch', 6)} per image "
            f"{thumbnail} thumbnail (dynamic_image_size={raw.get('dynamic_image_size')})"
        )
    else:
        checkpoint_tiles = "not recorded in a native config"
    served = TilingConfig()
    return CheckpointFacts(
        model_path=str(model_path),
        layout=layout,
        engine=_describe(engine),
        template=template.name,
        template_source=template.source,
        system_message=engine.chat_template.system_message,
        checkpoint_dtype=str(dtype),
        tokenizer_size=tokenizer_size,
        model_vocab_size=model_vocab,
        vocab_padding=model_vocab - tokenizer_size,
        image_size=engine.image_size,
        tokens_per_tile=engine.tokens_per_tile,
        checkpoint_tiles=checkpoint_tiles,
        served_tiles=(
            f"vendor images up to {served.vendor_max_tiles}, pickup images up to "
            f"{served.pickup_max_tiles} (plus a thumbnail when tiled)"
        ),
        remote_code=remote,
        code_files=tuple(sorted(p.name for p in model_path.glob("*.py"))),
    )


def check_model(
    model_path: Path,
    samples: Sequence[SampleRequest],
    *,
    device: str = "auto",
    max_new_tokens: int = 256,
    bf16: bool = True,
    progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, _: items,
    answer_limits: FieldLimits | None = None,
) -> ModelCheck:
    """Facts, the float32 run and (with `bf16`) the bfloat16 run; see the module docstring.

    Raises `ProcessingError(MODEL_NOT_LOADED)` when the checkpoint cannot be loaded (the
    same refusal a worker would give at start).
    """
    if not samples:
        raise ProcessingError(ErrorCode.INVALID_REQUEST, "no sample requests", "check-model")
    runs = []
    fp32, engine = run_precision(
        model_path,
        samples,
        dtype="float32",
        device=device,
        max_new_tokens=max_new_tokens,
        progress=progress,
        answer_limits=answer_limits,
    )
    facts = checkpoint_facts(model_path, engine)
    runs.append(fp32)
    del engine
    _release_memory()
    if bf16:
        run, _ = run_precision(
            model_path,
            samples,
            dtype="bfloat16",
            device=device,
            max_new_tokens=max_new_tokens,
            progress=progress,
            answer_limits=answer_limits,
        )
        runs.append(run)
    return ModelCheck(facts, tuple(runs))


def _release_memory() -> None:
    """Free the float32 models' GPU memory before the bfloat16 ones load."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
