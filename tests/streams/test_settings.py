"""Settings from the environment, and the engine configuration built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.runtime import engine_config
from streams.settings import Settings, SettingsError


def test_model_compile_turns_on_every_compile_option() -> None:
    default = engine_config(Settings.from_env({}), Path("/models/internvl"))
    assert not (default.compile_vision or default.compile_prefill or default.compile_decode)
    settings = Settings.from_env(
        {"VS_MODEL_COMPILE": "true", "VS_MODEL_MAX_BATCH": "512", "VS_MAX_NEW_TOKENS": "300"}
    )
    config = engine_config(settings, Path("/models/internvl"))
    assert config.compile_vision and config.compile_prefill and config.compile_decode
    assert (config.max_batch_size, config.max_new_tokens) == (512, 300)
    assert config.decode_attention == "auto"


def test_fused_projections_are_on_unless_turned_off() -> None:
    assert engine_config(Settings.from_env({}), Path("/m")).fuse_projections
    settings = Settings.from_env({"VS_MODEL_FUSE_PROJECTIONS": "0"})
    assert not engine_config(settings, Path("/m")).fuse_projections


def test_unreadable_flag_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="VS_MODEL_COMPILE"):
        Settings.from_env({"VS_MODEL_COMPILE": "sometimes"})


def test_the_web_server_binds_loopback_by_default(tmp_path: Path) -> None:
    from streams.app import create_app

    settings = Settings.from_env({"VS_STATE_DIR": str(tmp_path)})
    assert settings.web_host == "127.0.0.1" and settings.web_token is None
    app = create_app(settings)
    assert app.conf.web_bind == "127.0.0.1"  # what faust's aiohttp server binds


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "worker.internal"])  # noqa: S104
def test_a_non_loopback_binding_needs_a_token(host: str) -> None:
    with pytest.raises(SettingsError, match="VS_WEB_TOKEN"):
        Settings.from_env({"VS_WEB_HOST": host})
    settings = Settings.from_env({"VS_WEB_HOST": host, "VS_WEB_TOKEN": "t0ken-value"})
    assert settings.web_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_bindings_need_no_token(host: str) -> None:
    assert Settings.from_env({"VS_WEB_HOST": host}).web_host == host


def test_the_web_token_is_redacted() -> None:
    settings = Settings.from_env({"VS_WEB_HOST": "0.0.0.0", "VS_WEB_TOKEN": "t0ken-value"})  # noqa: S104
    assert settings.public()["web_token"] == "***"
    assert "t0ken-value" not in repr(settings) and "t0ken-value" not in str(settings.public())


def test_a_worker_exposed_without_a_token_refuses_to_start() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "VS_WEB_HOST": "0.0.0.0"}  # noqa: S104
    env.pop("VS_WEB_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "streams", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "VS_WEB_TOKEN" in done.stderr and "VS_WEB_HOST" in done.stderr


def test_static_membership_by_default_stable_per_host_role_and_port(tmp_path: Path) -> None:
    from streams.app import create_app

    inference = Settings.from_env({"VS_STATE_DIR": str(tmp_path)})
    again = Settings.from_env({"VS_STATE_DIR": str(tmp_path)})
    sink = Settings.from_env({"VS_STATE_DIR": str(tmp_path), "VS_ROLE": "sink"})
    second = Settings.from_env({"VS_STATE_DIR": str(tmp_path), "VS_WEB_PORT": "6070"})
    assert inference.group_instance_id and inference.group_instance_id == again.group_instance_id
    assert len({inference.group_instance_id, sink.group_instance_id, second.group_instance_id}) == 3
    assert inference.session_timeout_s == 10.0
    app = create_app(inference)
    assert app.conf.consumer_group_instance_id == inference.group_instance_id
    assert app.conf.broker_session_timeout == 10.0
    assert app.conf.broker_heartbeat_interval < app.conf.broker_session_timeout / 3


def test_group_instance_id_and_session_timeout_from_the_environment() -> None:
    settings = Settings.from_env({"VS_GROUP_INSTANCE_ID": "gpu-0", "VS_SESSION_TIMEOUT_S": "6"})
    assert (settings.group_instance_id, settings.session_timeout_s) == ("gpu-0", 6.0)
    assert Settings.from_env({"VS_GROUP_INSTANCE_ID": "off"}).group_instance_id is None
    with pytest.raises(SettingsError, match="VS_SESSION_TIMEOUT_S"):
        Settings.from_env({"VS_SESSION_TIMEOUT_S": "600"})


def test_public_settings_redact_every_password_and_keep_the_rest() -> None:
    settings = Settings.from_env(
        {
            "VS_KAFKA_BROKER": "kafka://svc:br0ker-pw@kafka.internal:9092",
            "VS_SCHEMA_REGISTRY_URL": "https://reg:reg1stry-pw@registry.internal:8081",
            "VS_CLICKHOUSE_DSN": "clickhouse://writer:cl1ck-pw@ch.internal:9000/visionstream",
            "VS_REVIEW_USERS": "alice:al1ce-pass,bob:b0b-password",
            "VS_WEB_HOST": "0.0.0.0",  # noqa: S104
            "VS_WEB_TOKEN": "t0ken-value",
        }
    )
    public = settings.public()
    text = repr(settings) + str(public)
    for secret in ("br0ker-pw", "reg1stry-pw", "cl1ck-pw", "al1ce-pass", "b0b-password", "t0ken"):
        assert secret not in text
    assert public["broker"] == "kafka://svc:***@kafka.internal:9092"
    assert public["schema_registry_url"] == "https://reg:***@registry.internal:8081"
    assert public["clickhouse_dsn"] == "clickhouse://writer:***@ch.internal:9000/visionstream"
    assert public["review"]["reviewers"] == ["alice", "bob"]
    assert public["web_token"] == "***"


def test_public_settings_without_secrets_show_no_redaction_marks() -> None:
    public = Settings.from_env({"VS_KAFKA_BROKER": "kafka://localhost:9092"}).public()
    assert public["broker"] == "kafka://localhost:9092"
    assert public["web_token"] is None and public["schema_registry_url"] == ""
    assert "***" not in str(public)
