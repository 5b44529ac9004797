"""Every topic's schema reads data written with its previous version.

Two sources of "previous": the released files `v1.avsc … vN.avsc` (each version reads
the one before), and git history (the latest file must read data written with every
committed state of every released file, so an in-place edit cannot break readers).
"""

from __future__ import annotations

import io
import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import fastavro
import pytest

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
def test_each_version_reads_the_previous_one(topic: str) -> None:
    versions = avro_versions(topic)
    assert versions[0] == 1 and versions == list(range(1, len(versions) + 1))
    for older, newer in itertools.pairwise(versions):
        writer, reader = avro_schema_json(topic, older), avro_schema_json(topic, newer)
        assert read(write(writer), writer, reader) is not None


@pytest.mark.parametrize("topic", avro_topics())
def test_latest_reads_every_committed_state(topic: str) -> None:
    latest = avro_schema_json(topic)
    for version in avro_versions(topic):
        for committed in committed_versions(AVRO_DIR / topic / f"v{version}.avsc"):
            assert read(write(committed), committed, latest) is not None


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


def test_a_field_added_without_default_is_caught() -> None:
    # The check above must be able to fail: a new required field breaks old data.
    old = avro_schema_json("product-listed", 1)
    new = {**old, "fields": [*old["fields"], {"name": "brand", "type": "string", "doc": "x"}]}
    with pytest.raises(Exception):  # noqa: B017 - fastavro raises SchemaResolutionError
        read(write(old), old, new)
