"""docker-compose.yml stays consistent with the code and the README.

Every `VS_*` variable a service sets is one `Settings.from_env` reads, image tags are
pinned versions (Kafka's the one `scripts/kafka` runs), health checks call routes the
worker of that role serves on its `VS_WEB_PORT`, and the worker and sink set only
settings the README documents.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
README = (REPO / "README.md").read_text(encoding="utf-8")
_DEFAULTED = re.compile(r"\$\{([A-Z0-9_]+):-([^}]*)\}")


def resolve(value: object) -> str:
    """The value docker compose uses when no variable is set: `${X:-default}` → default."""
    text = str(value)
    assert not re.search(r"\$\{[A-Z0-9_]+\}", text), f"{text}: a variable without a default"
    return _DEFAULTED.sub(lambda m: m.group(2), text)


def vs_environment(service: str) -> dict[str, str]:
    environment = SERVICES[service].get("environment", {})
    assert isinstance(environment, dict), f"{service}: use the mapping form of environment"
    return {k: resolve(v) for k, v in environment.items() if k.startswith("VS_")}


class RecordingEnv(Mapping[str, str]):
    """An environment that remembers every variable name looked up in it."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


APP_SERVICES = [name for name, s in SERVICES.items() if vs_environment(name)]


def test_the_worker_and_the_sink_are_the_app_services() -> None:
    roles = {name: vs_environment(name).get("VS_ROLE") for name in APP_SERVICES}
    assert roles == {"worker": "inference", "sink": "sink"}


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_vs_variable_is_a_setting(service: str, tmp_path: Path) -> None:
    values = {**vs_environment(service), "VS_STATE_DIR": str(tmp_path)}
    env = RecordingEnv(values)
    Settings.from_env(env)  # also: every value parses
    unknown = sorted(set(values) - env.read)
    assert not unknown, f"{service} sets variables Settings never reads: {unknown}"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_set_only_documented_settings(service: str) -> None:
    undocumented = sorted(v for v in vs_environment(service) if f"`{v}`" not in README)
    assert not undocumented, f"{service}: not in the README's settings table: {undocumented}"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_image_tags_are_pinned_versions(service: str) -> None:
    spec = SERVICES[service]
    image = resolve(spec["image"]) if "image" in spec else None
    if "build" in spec:
        return  # built from this checkout; the tag only names the local build
    assert image and ":" in image, f"{service}: no tag"
    tag = image.rsplit(":", 1)[1]
    assert re.fullmatch(r"\d+(\.\d+)+", tag), f"{service}: {image} is not a pinned version"


def test_the_kafka_image_is_the_version_scripts_kafka_runs() -> None:
    pom = (REPO / "kafka" / "pom.xml").read_text(encoding="utf-8")
    version = re.search(r"<kafka.version>(.+?)</kafka.version>", pom)
    assert version is not None
    assert resolve(SERVICES["kafka"]["image"]) == f"apache/kafka:{version.group(1)}"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_health_checks_call_a_route_the_role_serves(service: str, tmp_path: Path) -> None:
    from streams.app import create_app

    values = {**vs_environment(service), "VS_STATE_DIR": str(tmp_path), "VS_ENGINE": "replay"}
    settings = Settings.from_env(values)
    served = set(create_app(settings).web.views)
    check = " ".join(str(part) for part in SERVICES[service]["healthcheck"]["test"])
    url = re.search(r"http://localhost:(\d+)(/\S*)", check)
    assert url, f"{service}: the health check calls no local URL: {check}"
    assert int(url.group(1)) == settings.web_port, f"{service}: checks another port"
    assert url.group(2) in served, f"{service}: {url.group(2)} is not one of {sorted(served)}"
    assert str(settings.web_port) in [str(p) for p in SERVICES[service].get("expose", [])]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_run_the_worker_through_the_console_command(service: str) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    command = SERVICES[service]["command"]
    assert command[0] in scripts and command[1] == "worker", command


def test_the_kafka_health_check_uses_its_in_network_listener() -> None:
    kafka = SERVICES["kafka"]
    check = " ".join(kafka["healthcheck"]["test"])
    port = re.search(r"--bootstrap-server localhost:(\d+)", check)
    assert port and f":{port.group(1)}" in kafka["environment"]["KAFKA_LISTENERS"]
    broker = vs_environment("worker")["VS_KAFKA_BROKER"]
    assert broker == f"kafka://kafka:{port.group(1)}"
