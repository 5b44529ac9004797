"""Every topic's schema stays compatible with its previous versions, both ways.

`evolution_problems()` is the rule: each newer schema reads data written with each
older one (consumers upgraded first), and each older one reads data written with the
newer (the refund service may still hold an older schema). Two sources of "previous":
the released files `v1.avsc … vN.avsc`, and git history (every committed state of every
released file, so an in-place edit cannot break readers). Without git history the
history test fails when `CI` is set (CI runs on a clone, which has it) and is skipped,
visibly, elsewhere. Generated previous versions (a field added without a default, a
field removed that readers need, a type changed) prove that the rule catches a breaking
change in every topic's schema.
"""

from __future__ import annotations

import copy
import functools
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError
from fastavro.schema import SchemaParseException

from schemas import AVRO_DIR, avro_schema_json, avro_topics, avro_versions

REPO = Path(__file__).resolve().parents[2]


def sample(schema: Any, named: dict[str, Any] | None = None) -> Any:
    """A value that fits `schema`, using every field (defaults are not relied on)."""
    named = {} if named is None else named
    if isinstance(schema, list):
        return sample(next(s for s in schema if s != "null"), named)
    if isinstance(schema, str):
        if schema in named:
            return sample(named[schema], named)
        return {
            "string": "s",
            "int": 7,
            "long": 7,
            "double": 1.5,
            "float": 1.5,
            "boolean": True,
            "bytes": b"b",
            "null": None,
        }[schema]
    kind = schema["type"]
    if kind == "record":
        named[schema["name"]] = schema
        return {f["name"]: sample(f["type"], named) for f in schema["fields"]}
    if kind == "array":
        return [sample(schema["items"], named)]
    if kind == "map":
        return {"k": sample(schema["values"], named)}
    if kind == "enum":
        return schema["symbols"][0]
    return sample(kind, named)


def write(schema_json: dict[str, Any]) -> bytes:
    parsed = fastavro.parse_schema(schema_json)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed, sample(schema_json))
    return buffer.getvalue()


def read(data: bytes, writer: dict[str, Any], reader: dict[str, Any]) -> Any:
    return fastavro.schemaless_reader(
        io.BytesIO(data), fastavro.parse_schema(writer), fastavro.parse_schema(reader)
    )


# What fastavro raises when a reader cannot read a writer's data: a resolution error, a
# default the changed type cannot hold, or one of the others for data of the wrong type.
_INCOMPATIBLE = (
    SchemaResolutionError,
    SchemaParseException,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    EOFError,
)


def incompatibility(writer: dict[str, Any], reader: dict[str, Any]) -> str | None:
    """Why `reader` cannot read data written with `writer`, or None when it can."""
    try:
        read(write(writer), writer, reader)
    except _INCOMPATIBLE as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def evolution_problems(history: list[dict[str, Any]]) -> list[str]:
    """Every pair of schemas (oldest first) that cannot read each other's data."""
    problems = []
    for (i, older), (j, newer) in itertools.combinations(enumerate(history), 2):
        for label, writer, reader in (
            ("new reads old", older, newer),
            ("old reads new", newer, older),
        ):
            problem = incompatibility(writer, reader)
            if problem is not None:
                problems.append(f"#{i} -> #{j} ({label}): {problem}")
    return problems


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def committed_versions(path: Path) -> list[dict[str, Any]]:
    relative = path.relative_to(REPO).as_posix()
    try:
        commits = subprocess.run(
            ["git", "log", "--format=%H", "--", relative],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    versions = []
    for commit in commits:
        shown = subprocess.run(
            ["git", "show", f"{commit}:{relative}"], cwd=REPO, capture_output=True, text=True
        )
        if shown.returncode == 0:
            versions.append(json.loads(shown.stdout))
    return versions


@pytest.mark.parametrize("topic", avro_topics())
def test_released_versions_are_compatible_both_ways(topic: str) -> None:
    versions = avro_versions(topic)
    assert versions[0] == 1 and versions == list(range(1, len(versions) + 1))
    released = [avro_schema_json(topic, version) for version in versions]
    assert evolution_problems(released) == []


@pytest.mark.parametrize("topic", avro_topics())
def test_every_committed_state_is_compatible_with_the_latest(topic: str) -> None:
    latest = avro_schema_json(topic)
    committed = [
        state
        for version in avro_versions(topic)
        for state in committed_versions(AVRO_DIR / topic / f"v{version}.avsc")
    ]
    if not committed:
        reason = f"no git history for schemas/avro/{topic} (not a git checkout, or uncommitted)"
        if in_ci():
            pytest.fail(f"{reason}: CI must check the committed states, not pass empty")
        pytest.skip(reason)
    problems = [p for state in committed for p in evolution_problems([state, latest])]
    assert problems == []


@pytest.mark.parametrize("topic", avro_topics())
def test_every_field_is_documented(topic: str) -> None:
    def check(schema: Any) -> None:
        if isinstance(schema, list):
            for branch in schema:
                check(branch)
        elif isinstance(schema, dict):
            if schema.get("type") == "record":
                assert schema.get("doc"), f"{topic}: record {schema['name']} has no doc"
                for field in schema["fields"]:
                    assert field.get("doc"), f"{topic}: field {field['name']} has no doc"
                    check(field["type"])
            elif schema.get("type") == "array":
                check(schema["items"])
            elif schema.get("type") == "map":
                check(schema["values"])

    check(avro_schema_json(topic))


def fields_without_default(schema: dict[str, Any]) -> list[str]:
    return [f["name"] for f in schema["fields"] if "default" not in f]


def with_field(schema: dict[str, Any], field: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(schema), "fields": [*copy.deepcopy(schema["fields"]), field]}


@pytest.mark.parametrize("topic", avro_topics())
def test_a_field_added_without_a_default_is_caught(topic: str) -> None:
    latest = avro_schema_json(topic)
    broken = with_field(latest, {"name": "added_field", "type": "string", "doc": "x"})
    assert any("new reads old" in p for p in evolution_problems([latest, broken]))
    # With a default, the same addition is a compatible change.
    fine = with_field(latest, {"name": "added_field", "type": "string", "default": "", "doc": "x"})
    assert evolution_problems([latest, fine]) == []


@pytest.mark.parametrize("topic", avro_topics())
def test_a_removed_field_that_readers_need_is_caught(topic: str) -> None:
    latest = avro_schema_json(topic)
    required = fields_without_default(latest)
    assert required, f"{topic}: every field has a default, nothing to remove"
    removed = {**latest, "fields": [f for f in latest["fields"] if f["name"] != required[0]]}
    assert any("old reads new" in p for p in evolution_problems([latest, removed]))


@pytest.mark.parametrize("topic", avro_topics())
def test_a_changed_field_type_is_caught(topic: str) -> None:
    latest = avro_schema_json(topic)
    changed = copy.deepcopy(latest)
    field = next(f for f in changed["fields"] if f["type"] in ("string", ["null", "string"]))
    field["type"] = "boolean" if field["type"] == "string" else ["null", "boolean"]
    assert evolution_problems([latest, changed]) != []


def test_without_history_ci_fails_instead_of_passing_empty(tmp_path: Path) -> None:
    # A copy of the schemas and of this file outside any git checkout, run as CI runs it.
    shutil.copytree(REPO / "schemas", tmp_path / "schemas")
    (tmp_path / "tests" / "schemas").mkdir(parents=True)
    for package in ("tests", "tests/schemas"):
        (tmp_path / package / "__init__.py").write_text("")
    shutil.copy(Path(__file__), tmp_path / "tests" / "schemas" / "test_avro_evolution.py")
    run = functools.partial(
        subprocess.run,
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "committed_state"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    env = {k: v for k, v in os.environ.items() if k not in {"CI", "GIT_DIR", "GIT_WORK_TREE"}}
    in_ci_run = run(env={**env, "CI": "true", "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert in_ci_run.returncode != 0, in_ci_run.stdout
    assert "CI must check the committed states" in in_ci_run.stdout
    local_run = run(env={**env, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert local_run.returncode == 0 and "skipped" in local_run.stdout, local_run.stdout
