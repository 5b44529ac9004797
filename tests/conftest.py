"""Shared fixtures: the real local Kafka broker, and workers run as real processes.

The broker is started once per test session by the repo's own `scripts/kafka`, on
its own ports and data folder (so a developer's broker on 9092 is left alone), and
stopped at the end. Broker tests are never skipped: if it cannot start, they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # torch is imported only by the tests that use a tiny model
    from tests.support.tiny_internvl import TinyCheckpoints

REPO = Path(__file__).resolve().parents[1]
TEST_KAFKA_PORT = int(os.environ.get("VS_TEST_KAFKA_PORT", "19192"))


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    env = {
        **os.environ,
        "KAFKA_HOME_DIR": str(REPO / ".cache" / f"kafka-test-{TEST_KAFKA_PORT}"),
        "KAFKA_PORT": str(TEST_KAFKA_PORT),
        "KAFKA_CONTROLLER_PORT": str(TEST_KAFKA_PORT + 1),
        "KAFKA_NUM_PARTITIONS": "4",
    }
    script = str(REPO / "scripts" / "kafka")
    started = subprocess.run(
        [script, "start"], env=env, capture_output=True, text=True, timeout=600
    )
    if started.returncode != 0:
        pytest.fail(f"the local Kafka broker did not start:\n{started.stdout}\n{started.stderr}")
    try:
        yield f"127.0.0.1:{TEST_KAFKA_PORT}"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)


class LocalRegistry:
    """The session's Apicurio Registry (`scripts/registry`); `stop`/`start` simulate an outage."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/apis/ccompat/v7"
        self._script = str(REPO / "scripts" / "registry")
        self._env = {
            **os.environ,
            "REGISTRY_HOME_DIR": str(REPO / ".cache" / f"registry-test-{port}"),
            "REGISTRY_PORT": str(port),
            "REGISTRY_MANAGEMENT_PORT": str(port + 1),
        }

    def run(self, command: str) -> None:
        done = subprocess.run(
            [self._script, command], env=self._env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            pytest.fail(f"scripts/registry {command} failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        self.run("start")

    def stop(self) -> None:
        self.run("stop")


@pytest.fixture(scope="session")
def schema_registry() -> Iterator[LocalRegistry]:
    """A real schema registry on 127.0.0.1, started once per session with empty storage.

    Its ports follow the test broker's (VS_TEST_KAFKA_PORT + 2 and + 3), so two sessions
    with different broker ports do not collide. Never skipped: if it cannot start, tests fail.
    """
    registry = LocalRegistry(TEST_KAFKA_PORT + 2)
    registry.run("reset")
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic names and consumer groups of one test."""
    return uuid.uuid4().hex[:8]


def streams_cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """Run `python -m streams ARGS` with `env`; returns stdout, fails the test on error."""
    done = subprocess.run(
        [sys.executable, "-m", "streams", *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"streams {args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def topic_env(suffix: str) -> dict[str, str]:
    """VS_TOPIC_* variables giving a test its own set of topics."""
    names = [
        "pickup_completed",
        "product_listed",
        "verification_decision",
        "category_tag",
        "verification_attempts",
        "dead_letter",
        "verification_review",
        "review_image",
    ]
    return {f"VS_TOPIC_{n.upper()}": f"{n.replace('_', '-')}-{suffix}" for n in names}


class WorkerProcess:
    """`python -m streams worker` in a subprocess, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, module: str = "streams") -> None:
        self.log_path = log_path
        # The child keeps its own descriptor of the log; ours closes once it is started.
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, "worker", "-l", "info"],
                env={**os.environ, **env},
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@pytest.fixture(scope="session")
def categorizer_artifacts() -> Path:
    """Categorizer artifacts trained on the in-repo sample set, cached by its content hash."""
    import hashlib

    from streams.settings import Settings
    from streams.training import SAMPLE_TRAINING_CSV, train

    digest = hashlib.sha256(SAMPLE_TRAINING_CSV.read_bytes()).hexdigest()[:12]
    out = REPO / ".cache" / "test-artifacts" / f"categorizer-{digest}"
    if not (out / "manifest.json").is_file():
        train(Settings(), SAMPLE_TRAINING_CSV, out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    """The tiny InternVL checkpoints of the session (read-only: copy one before changing it)."""
    from tests.support.tiny_internvl import TinyCheckpoints

    return TinyCheckpoints(tmp_path_factory.mktemp("tiny-internvl"))


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded ClickHouse (chDB) of this test process: one engine path per process."""
    return f"chdb://{tmp_path_factory.getbasetemp() / 'chdb-engine'}"


@pytest.fixture(scope="module")
def module_client(dsn: str) -> Iterator[Any]:
    """A client of `dsn` with every migration applied, for one test module."""
    from processors.analytics.client import open_client
    from processors.analytics.migrations import apply_migrations

    client = open_client(dsn)
    apply_migrations(client)
    yield client
    client.command("SYSTEM START MERGES")
    client.close()
