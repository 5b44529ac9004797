"""One frozen settings object, built once at start-up from the environment.

Nothing else in the project reads environment variables: `Settings.from_env()` is
called at the edge (`python -m streams ...`) and the result is passed down.
Secrets (passwords inside DSNs and URLs, the web token) never appear in `repr()` or
`public()`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Re-exported: the streams layer names the topics `streams.settings.Topics`.
from processors.contracts import Topics as Topics
from processors.gathering import GatherLimits
from streams.logs import redact_passwords
from streams.review_settings import ReviewSettings, ReviewSettingsError

DEFAULT_STATE_DIR = ".cache/visionstream"
PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLES_DIR = PACKAGE_DIR / "samples"


class SettingsError(ValueError):
    """An environment variable has an unusable value; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs; see the README's settings table for each variable."""

    broker: str = "kafka://127.0.0.1:9092"
    app_id: str = "visionstream"
    role: str = "inference"  # "inference" or "sink"
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    web_token: str | None = None
    topics: Topics = field(default_factory=Topics)
    topic_partitions: int = 4
    batch_size: int = 16
    batch_wait_s: float = 0.5
    max_message_bytes: int = 16 * 1024 * 1024
    schema_registry_url: str | None = None
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    clickhouse_dsn: str = ""
    sink_max_rows: int = 500
    sink_max_interval_s: float = 2.0
    engine: str = ""  # "internvl", "replay", or "" (InternVL when a model path is set)
    model_path: Path | None = None
    replay_outputs: Path | None = SAMPLES_DIR / "recorded_outputs.jsonl"
    replay_latency_s: float = 0.0
    max_new_tokens: int = 2000
    model_max_batch: int = 32
    model_compile: bool = False
    model_fuse_projections: bool = True  # one product for q/k/v and for gate/up per layer
    constrained_decoding: bool = True  # VS_CONSTRAINED_DECODING=0: free decoding + retry
    # "slot" (continuous batching), "static" micro-batches, or "auto": slot for the native
    # InternVL engine, static for the others (replay, remote code).
    engine_mode: str = "auto"
    slot_count: int = 0  # 0: sized from free GPU memory (16 on CPU)
    slot_prefill_tokens: int = 32768
    slot_context_length: int = 0  # 0: 4096 + max_new_tokens, rounded up to 128
    slot_queue_size: int = 256
    slot_staged_requests: int = 256  # requests whose tiles may wait in pinned host memory
    slot_forced_tokens: int = 16  # 0: constrained answers step through forced tokens too
    slot_follow_model: bool = False  # forced runs give way to the model's own split
    slot_mixed_chunk: int = 0  # prompt tokens a free decode step carries; 0: off
    categorizer_artifacts: Path | None = None
    image_encoder: str = "efficientnet-lite0"
    image_input_size: int = 224
    resnet50_weights: Path | None = None
    gather: GatherLimits = field(default_factory=GatherLimits)
    log_format: str = "auto"  # "json", "text" or "auto" (text on a terminal)
    shutdown_timeout_s: float = 30.0
    lag_refresh_s: float = 10.0
    review: ReviewSettings = field(default_factory=ReviewSettings)
    group_instance_id: str | None = None  # static group membership; None: dynamic
    session_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        """Refuse a web server reachable from other hosts without a token.

        Raises `SettingsError`: the data pages (`/reports`, `/info`, `/metrics`) would
        be open to the network.
        """
        if not self.web_token and not is_loopback_host(self.web_host):
            raise SettingsError(
                f"VS_WEB_HOST={self.web_host!r} is reachable from other hosts, so VS_WEB_TOKEN "
                "must be set (the bearer token that /reports, /info and /metrics require); "
                "or bind VS_WEB_HOST=127.0.0.1"
            )

    @property
    def sink_app_id(self) -> str:
        """The sink's consumer group id (`app_id` + "-sink")."""
        return f"{self.app_id}-sink"

    @property
    def effective_clickhouse_dsn(self) -> str:
        """The configured DSN, else an embedded chDB database under `state_dir`."""
        return self.clickhouse_dsn or f"chdb://{(self.state_dir / 'clickhouse').resolve()}"

    def public(self) -> dict[str, Any]:
        """Settings as plain data with secrets redacted, for logs and the info page."""
        return {
            "broker": redact_passwords(self.broker),
            "app_id": self.app_id,
            "role": self.role,
            "web_port": self.web_port,
            "web_host": self.web_host,
            "web_token": "***" if self.web_token else None,
            "topics": {f.name: getattr(self.topics, f.name) for f in fields(self.topics)},
            "batch_size": self.batch_size,
            "batch_wait_s": self.batch_wait_s,
            "max_message_bytes": self.max_message_bytes,
            "schema_registry_url": redact_passwords(self.schema_registry_url or ""),
            "clickhouse_dsn": redact_passwords(self.effective_clickhouse_dsn),
            "engine": self.engine or ("internvl" if self.model_path else None),
            "engine_mode": self.engine_mode,
            "model_path": str(self.model_path) if self.model_path else None,
            "replay_outputs": str(self.replay_outputs) if self.replay_outputs else None,
            "categorizer_artifacts": str(self.categorizer_artifacts or ""),
            "image_encoder": self.image_encoder,
            "review": self.review.public(),
            "group_instance_id": self.group_instance_id,
            "session_timeout_s": self.session_timeout_s,
        }

    def __repr__(self) -> str:
        return f"Settings({self.public()!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `VS_*` variables (and the former service's `MODEL_PATH`).

        Raises `SettingsError` naming the variable when a value cannot be parsed.
        """
        env = os.environ if env is None else env
        reader = _EnvReader(env)
        default = cls()
        state_dir = Path(reader.text("VS_STATE_DIR", str(default.state_dir)))
        model_path = env.get("VS_MODEL_PATH") or env.get("MODEL_PATH")
        gather_default = GatherLimits()
        topics = Topics(
            **{
                f.name: reader.text(f"VS_TOPIC_{f.name.upper()}", getattr(Topics(), f.name))
                for f in fields(Topics)
            }
        )
        role = reader.text("VS_ROLE", default.role)
        if role not in {"inference", "sink"}:
            raise SettingsError(f"VS_ROLE must be 'inference' or 'sink', got {role!r}")
        replay = env.get("VS_REPLAY_OUTPUTS")
        try:
            review = ReviewSettings.from_env(env)
        except ReviewSettingsError as exc:
            raise SettingsError(str(exc)) from None
        engine = reader.text("VS_ENGINE", "").lower()
        if engine not in {"", "internvl", "replay"}:
            raise SettingsError(f"VS_ENGINE must be 'internvl' or 'replay', got {engine!r}")
        engine_mode = reader.text("VS_ENGINE_MODE", default.engine_mode).lower()
        if engine_mode not in {"auto", "static", "slot"}:
            raise SettingsError(
                f"VS_ENGINE_MODE must be 'auto', 'static' or 'slot', got {engine_mode!r}"
            )
        web_port = reader.integer("VS_WEB_PORT", 6067 if role == "sink" else default.web_port)
        instance = reader.text("VS_GROUP_INSTANCE_ID", "")
        if instance.lower() == "off":
            group_instance_id = None
        else:
            # Stable across restarts; two workers on one host differ by their web port.
            group_instance_id = instance or f"{socket.gethostname()}-{role}-{web_port}"
        session_timeout_s = reader.number("VS_SESSION_TIMEOUT_S", default.session_timeout_s)
        if not 1.0 <= session_timeout_s <= 90.0:
            raise SettingsError(
                f"VS_SESSION_TIMEOUT_S must be between 1 and 90 seconds, got {session_timeout_s}"
            )
        return cls(
            broker=reader.text("VS_KAFKA_BROKER", default.broker),
            app_id=reader.text("VS_APP_ID", default.app_id),
            role=role,
            web_port=web_port,
            web_host=reader.text("VS_WEB_HOST", default.web_host),
            web_token=env.get("VS_WEB_TOKEN") or None,
            topics=topics,
            topic_partitions=reader.integer("VS_TOPIC_PARTITIONS", default.topic_partitions),
            batch_size=reader.integer("VS_BATCH_SIZE", default.batch_size),
            batch_wait_s=reader.number("VS_BATCH_WAIT_S", default.batch_wait_s),
            max_message_bytes=reader.integer("VS_MAX_MESSAGE_BYTES", default.max_message_bytes),
            schema_registry_url=env.get("VS_SCHEMA_REGISTRY_URL") or None,
            state_dir=state_dir,
            clickhouse_dsn=env.get("VS_CLICKHOUSE_DSN", ""),
            sink_max_rows=reader.integer("VS_SINK_MAX_ROWS", default.sink_max_rows),
            sink_max_interval_s=reader.number(
                "VS_SINK_MAX_INTERVAL_S", default.sink_max_interval_s
            ),
            engine=engine,
            model_path=Path(model_path) if model_path else None,
            replay_outputs=Path(replay) if replay else default.replay_outputs,
            replay_latency_s=reader.number("VS_REPLAY_LATENCY_S", 0.0),
            max_new_tokens=reader.integer("VS_MAX_NEW_TOKENS", default.max_new_tokens),
            model_max_batch=reader.integer("VS_MODEL_MAX_BATCH", default.model_max_batch),
            model_compile=reader.flag("VS_MODEL_COMPILE", default.model_compile),
            model_fuse_projections=reader.flag(
                "VS_MODEL_FUSE_PROJECTIONS", default.model_fuse_projections
            ),
            constrained_decoding=reader.flag(
                "VS_CONSTRAINED_DECODING", default.constrained_decoding
            ),
            engine_mode=engine_mode,
            slot_count=reader.integer("VS_SLOT_COUNT", default.slot_count),
            slot_prefill_tokens=max(
                1, reader.integer("VS_SLOT_PREFILL_TOKENS", default.slot_prefill_tokens)
            ),
            slot_context_length=reader.integer(
                "VS_SLOT_CONTEXT_LENGTH", default.slot_context_length
            ),
            slot_queue_size=max(1, reader.integer("VS_SLOT_QUEUE_SIZE", default.slot_queue_size)),
            slot_staged_requests=max(
                2, reader.integer("VS_SLOT_STAGED_REQUESTS", default.slot_staged_requests)
            ),
            slot_forced_tokens=max(
                0, reader.integer("VS_SLOT_FORCED_TOKENS", default.slot_forced_tokens)
            ),
            slot_follow_model=reader.flag("VS_SLOT_FOLLOW_MODEL", default.slot_follow_model),
            slot_mixed_chunk=reader.integer("VS_SLOT_MIXED_CHUNK", default.slot_mixed_chunk),
            categorizer_artifacts=Path(env["VS_CATEGORIZER_ARTIFACTS"])
            if env.get("VS_CATEGORIZER_ARTIFACTS")
            else state_dir / "categorizer",
            image_encoder=reader.text("VS_IMAGE_ENCODER", default.image_encoder),
            image_input_size=reader.integer("VS_IMAGE_INPUT_SIZE", default.image_input_size),
            resnet50_weights=Path(env["VS_RESNET50_WEIGHTS"])
            if env.get("VS_RESNET50_WEIGHTS")
            else None,
            gather=GatherLimits(
                max_image_bytes=reader.integer(
                    "VS_IMAGE_MAX_BYTES", gather_default.max_image_bytes
                ),
                connect_timeout_s=reader.number(
                    "VS_IMAGE_CONNECT_TIMEOUT_S", gather_default.connect_timeout_s
                ),
                total_timeout_s=reader.number(
                    "VS_IMAGE_TOTAL_TIMEOUT_S", gather_default.total_timeout_s
                ),
                retries=reader.integer("VS_IMAGE_RETRIES", gather_default.retries),
                per_host_concurrency=reader.integer(
                    "VS_IMAGE_PER_HOST_CONCURRENCY", gather_default.per_host_concurrency
                ),
                allow_loopback=reader.flag("VS_IMAGE_ALLOW_LOOPBACK", False),
                allow_private=reader.flag("VS_IMAGE_ALLOW_PRIVATE", False),
                url_rewrites=reader.rewrites("VS_IMAGE_URL_REWRITES"),
            ),
            log_format=reader.text("VS_LOG_FORMAT", default.log_format),
            shutdown_timeout_s=reader.number("VS_SHUTDOWN_TIMEOUT_S", default.shutdown_timeout_s),
            lag_refresh_s=reader.number("VS_LAG_REFRESH_S", default.lag_refresh_s),
            review=review,
            group_instance_id=group_instance_id,
            session_timeout_s=session_timeout_s,
        )


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class _EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str) -> str:
        return self._env.get(name, default) or default

    def integer(self, name: str, default: int) -> int:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError as exc:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc
        if value < 0:
            raise SettingsError(f"{name} must not be negative, got {value}")
        return value

    def number(self, name: str, default: float) -> float:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return float(raw)
        except ValueError as exc:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from exc

    def flag(self, name: str, default: bool) -> bool:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")

    def rewrites(self, name: str) -> tuple[tuple[str, str], ...]:
        """`prefix=>replacement` rules separated by `;`."""
        raw = self._env.get(name, "")
        rules = []
        for part in filter(None, (p.strip() for p in raw.split(";"))):
            prefix, sep, replacement = part.partition("=>")
            if not sep or not prefix:
                raise SettingsError(f"{name}: rule {part!r} is not 'prefix=>replacement'")
            rules.append((prefix.strip(), replacement.strip()))
        return tuple(rules)
