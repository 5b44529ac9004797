"""Event contracts and DDL shipped as data files, with small loaders.

- `avro/<topic>/v<N>.avsc`: the Avro schema of each topic, one file per released
  version. A released version is never edited; a change adds `v<N+1>.avsc`, and
  every field it adds needs a default so it can read data written with `v<N>`.
- `json/model_answer.schema.json`: the JSON Schema the VLM's answer must meet.
- `clickhouse/`: versioned DDL and the SQL of each named report.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parent
AVRO_DIR = SCHEMA_DIR / "avro"
JSON_DIR = SCHEMA_DIR / "json"
CLICKHOUSE_DIR = SCHEMA_DIR / "clickhouse"


def avro_topics() -> list[str]:
    """Names of every topic that has an Avro schema."""
    return sorted(p.name for p in AVRO_DIR.iterdir() if p.is_dir())


def avro_versions(topic: str) -> list[int]:
    """Released versions of a topic's schema, oldest first."""
    folder = AVRO_DIR / topic
    if not folder.is_dir():
        raise KeyError(f"no Avro schema for topic {topic!r}; known: {avro_topics()}")
    return sorted(int(p.stem[1:]) for p in folder.glob("v*.avsc"))


@cache
def avro_schema_json(topic: str, version: int | None = None) -> dict[str, Any]:
    """The schema as JSON (latest version by default); raises KeyError if unknown."""
    versions = avro_versions(topic)
    chosen = versions[-1] if version is None else version
    path = AVRO_DIR / topic / f"v{chosen}.avsc"
    if not path.is_file():
        raise KeyError(f"no version {chosen} of the {topic!r} schema; have {versions}")
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


@cache
def model_answer_schema() -> dict[str, Any]:
    """JSON Schema of the VLM's answer (see `json/model_answer.schema.json`)."""
    path = JSON_DIR / "model_answer.schema.json"
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded
