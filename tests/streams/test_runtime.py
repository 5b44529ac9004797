"""The runtime without a broker: engine choice at start-up (the replay engine only when asked
for by name), start-up order and failure, and what each role registers in the app."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from processors.errors import ErrorCode, ProcessingError
from processors.inference import ReplayEngine
from streams.runtime import build_engine, in_daemon_thread, slot_engine
from streams.settings import Settings, SettingsError


def recorded(tmp_path: Path) -> Path:
    path = tmp_path / "outputs.jsonl"
    path.write_text('{"uuid": "u-1", "model_outputs": ["{}"]}\n')
    return path


def test_no_model_and_no_engine_choice_refuses_naming_the_settings(tmp_path: Path) -> None:
    settings = Settings.from_env({"VS_REPLAY_OUTPUTS": str(recorded(tmp_path))})
    with pytest.raises(ProcessingError) as caught:
        build_engine(settings)
    assert caught.value.code is ErrorCode.MODEL_NOT_LOADED
    assert "VS_MODEL_PATH" in caught.value.message
    assert "VS_ENGINE=replay" in caught.value.message


def test_replay_when_asked_for(tmp_path: Path) -> None:
    env = {"VS_ENGINE": "replay", "VS_REPLAY_OUTPUTS": str(recorded(tmp_path))}
    engine = build_engine(Settings.from_env(env))
    assert isinstance(engine, ReplayEngine)


def test_replay_without_recordings_refuses(tmp_path: Path) -> None:
    env = {"VS_ENGINE": "replay", "VS_REPLAY_OUTPUTS": str(tmp_path / "missing.jsonl")}
    with pytest.raises(ProcessingError, match="VS_REPLAY_OUTPUTS"):
        build_engine(Settings.from_env(env))


def test_an_unknown_engine_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="VS_ENGINE"):
        Settings.from_env({"VS_ENGINE": "gpt"})


@pytest.mark.parametrize(
    ("mode", "wrapped"), [("", True), ("auto", True), ("slot", True), ("static", False)]
)
def test_the_native_engine_runs_on_the_slot_engine_unless_static_is_asked_for(
    tmp_path: Path, mode: str, wrapped: bool
) -> None:
    from processors.internvl import EngineConfig, NativeInternVLEngine
    from processors.slot_engine import SlotEngine

    native = NativeInternVLEngine(EngineConfig(str(tmp_path / "checkpoint")))  # not loaded
    env = {"VS_ENGINE_MODE": mode, "VS_SLOT_COUNT": "3"} if mode else {"VS_SLOT_COUNT": "3"}
    engine = slot_engine(Settings.from_env(env), native)
    assert isinstance(engine, SlotEngine) is wrapped
    if isinstance(engine, SlotEngine):
        assert engine.engine is native and engine.config.slots == 3
    else:
        assert engine is native


def test_forced_runs_are_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    from processors.internvl import EngineConfig, NativeInternVLEngine
    from processors.slot_engine import SlotEngine

    native = NativeInternVLEngine(EngineConfig(str(tmp_path / "checkpoint")))
    for env, forced in (({}, 16), ({"VS_SLOT_FORCED_TOKENS": "0"}, 0)):
        engine = slot_engine(Settings.from_env(env), native)
        assert isinstance(engine, SlotEngine) and engine.config.forced_tokens == forced
        assert not engine.config.follow_model
    engine = slot_engine(Settings.from_env({"VS_SLOT_FOLLOW_MODEL": "true"}), native)
    assert isinstance(engine, SlotEngine) and engine.config.follow_model


def test_the_staged_tiles_bound_reaches_the_slot_engine(tmp_path: Path) -> None:
    from processors.internvl import EngineConfig, NativeInternVLEngine
    from processors.slot_engine import SlotEngine

    native = NativeInternVLEngine(EngineConfig(str(tmp_path / "checkpoint")))
    for env, staged in (({}, 256), ({"VS_SLOT_STAGED_REQUESTS": "8"}, 8)):
        engine = slot_engine(Settings.from_env(env), native)
        assert isinstance(engine, SlotEngine) and engine.config.staged_requests == staged


def test_the_mixed_chunk_setting_reaches_the_slot_engine(tmp_path: Path) -> None:
    from processors.internvl import EngineConfig, NativeInternVLEngine
    from processors.slot_engine import SlotEngine

    native = NativeInternVLEngine(EngineConfig(str(tmp_path / "checkpoint")))
    default = Settings().slot_mixed_chunk
    for env, chunk in (({}, default), ({"VS_SLOT_MIXED_CHUNK": "512"}, 512)):
        engine = slot_engine(Settings.from_env(env), native)
        assert isinstance(engine, SlotEngine) and engine.config.mixed_chunk_tokens == chunk
    with pytest.raises(SettingsError, match="VS_SLOT_MIXED_CHUNK must not be negative"):
        Settings.from_env({"VS_SLOT_MIXED_CHUNK": "-3"})


def test_engines_that_cannot_be_wrapped_stay_static_and_warn_only_when_slot_was_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    replay = ReplayEngine({"u-1": ["{}"]})
    assert slot_engine(Settings.from_env({}), replay) is replay
    assert "needs the native InternVL engine" not in caplog.text
    assert slot_engine(Settings.from_env({"VS_ENGINE_MODE": "slot"}), replay) is replay
    assert "needs the native InternVL engine" in caplog.text
    with pytest.raises(SettingsError, match="VS_ENGINE_MODE"):
        Settings.from_env({"VS_ENGINE_MODE": "fast"})


# ------------------------------------------------------------------ wiring, without a broker


async def test_verification_is_ready_before_the_categorizer_and_a_missing_one_stops_start(
    tmp_path: Path,
) -> None:
    from streams.handlers import RawMessage
    from streams.metrics import Metrics
    from streams.runtime import InferenceRuntime
    from tests.support.events import pickup_event, valid_answer
    from tests.support.publishing import RecordingPublisher

    outputs = tmp_path / "outputs.jsonl"
    outputs.write_text(json.dumps({"uuid": "req-00001", "model_outputs": [valid_answer()]}) + "\n")
    settings = Settings.from_env(
        {
            "VS_ENGINE": "replay",
            "VS_REPLAY_OUTPUTS": str(outputs),
            "VS_STATE_DIR": str(tmp_path),
            "VS_CATEGORIZER_ARTIFACTS": str(tmp_path / "no-artifacts"),
        }
    )
    metrics = Metrics()
    runtime = InferenceRuntime(settings, metrics)
    try:
        with pytest.raises(ProcessingError) as caught:
            await runtime.start()
        assert caught.value.code is ErrorCode.MODEL_NOT_LOADED
        assert "VS_CATEGORIZER_ARTIFACTS" in caught.value.message
        assert runtime.failed is caught.value
        assert runtime.verification_ready.is_set() and not runtime.ready.is_set()
        assert runtime.categorization is None
        assert runtime.model_versions == {"verification": "replay:recorded-outputs"}
        assert runtime.streaming_verifier(lambda: runtime.new_writer(publisher)) is None

        publisher = RecordingPublisher()
        handler = runtime.verification
        assert handler is not None
        value = runtime.codecs.for_schema("pickup-completed").encode(pickup_event(1))
        writer = runtime.new_writer(publisher)
        await handler.handle([RawMessage("pickup-completed", 0, 0, b"k", value)], writer)
        await writer.flush()
    finally:
        await runtime.stop()
    sent = publisher.topics()
    assert sent[:2] == ["verification-attempts", "verification-decision"]
    assert set(sent[2:]) == {"review-image"}  # review copies are on by default
    # The pipeline reports its phases to the runtime's metrics.
    model = metrics.registry.get_sample_value(
        "visionstream_phase_seconds_count", {"phase": "model"}
    )
    assert model == 1


class ClosingSink:
    dsn = "chdb://test"

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_each_role_registers_its_agents_and_runtime(tmp_path: Path) -> None:
    from streams.app import create_app
    from streams.runtime import InferenceRuntime, SinkRuntime

    inference = create_app(Settings.from_env({"VS_STATE_DIR": str(tmp_path)}))
    assert set(inference.agents) == {"verify-pickups", "categorize-listings"}
    assert isinstance(inference.conf.runtime, InferenceRuntime)
    sink_settings = Settings.from_env({"VS_STATE_DIR": str(tmp_path), "VS_ROLE": "sink"})
    sink = create_app(sink_settings, sink=ClosingSink())
    assert set(sink.agents) == {"analytics-sink"}
    assert isinstance(sink.conf.runtime, SinkRuntime)


async def test_the_shutdown_hook_stops_the_roles_runtime(tmp_path: Path) -> None:
    from streams.app import create_app

    closing = ClosingSink()
    settings = Settings.from_env({"VS_STATE_DIR": str(tmp_path), "VS_ROLE": "sink"})
    app = create_app(settings, sink=closing)
    await app.on_before_shutdown.send()
    assert closing.closed == 1


async def test_model_loads_run_on_a_daemon_thread_and_hand_back_result_or_error() -> None:
    seen: list[threading.Thread] = []

    def load() -> str:
        seen.append(threading.current_thread())
        return "loaded"

    assert await in_daemon_thread(load, "load-test") == "loaded"
    assert seen[0].daemon and seen[0].name == "load-test"
    assert seen[0] is not threading.main_thread()

    def refuse() -> str:
        raise ProcessingError(ErrorCode.MODEL_NOT_LOADED, "no weights", "model")

    with pytest.raises(ProcessingError) as raised:
        await in_daemon_thread(refuse, "load-test")
    assert raised.value.code is ErrorCode.MODEL_NOT_LOADED
