"""Reading the model's answer: JSON extraction from messy text, then schema validation.

A 1B vision-language model does not reliably emit clean JSON: it wraps the object in
markdown fences or prose, uses single quotes, Python literals, trailing commas, or stops
mid-object. `extract_json` tries, from strict to lenient (docs/former-service.md):

1. each fenced block (```json ... ```), then the text without fences, then the raw text;
   for each: `json.loads`, then `yaml.safe_load` (dict results only), then the outermost
   `{...}` through `json.loads` / `ast.literal_eval` / `yaml.safe_load`, then the same
   object repaired (single quotes, trailing commas, True/False/None, bare `85%`);
2. finally a per-field regex for `image_analysis`, `verification_results` and
   `pickup_confidence` (as the former service did), for answers with broken glue.

Deviation from the former service: `json.loads` runs before `yaml.safe_load`. For valid JSON both give
the same dict, but JSON's reading is exact (YAML 1.1 has other escapes and reads unquoted
yes/no as booleans), so YAML only handles what JSON cannot.

A dict is preferred when it holds one of the three answer keys: prose such as
"Result: {...}" parses as YAML to `{"Result": {...}}`, and the search must go on.

Nothing here raises on bad model text; failures are reported as data (`ParsedAnswer.error`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from schemas import model_answer_schema

ANSWER_KEYS: Final = ("image_analysis", "verification_results", "pickup_confidence")
#: Error text of `ParsedAnswer` when no candidate dict was found at all.
NO_JSON_ERROR: Final = "no JSON object found"
#: Validation messages quote the offending value; keep them small for the attempts topic.
MAX_ERROR_CHARS: Final = 500
#: Longer texts are cut before parsing: the model's limit is 2000 new tokens, so anything
#: much longer is not a model answer and must not cost seconds of parsing.
MAX_TEXT_CHARS: Final = 200_000

_FENCE_RE: Final = re.compile(r"```[ \t]*[A-Za-z]*[ \t]*\r?\n?(.*?)(?:```|\Z)", re.DOTALL)
_FIELD_RE: Final = {
    key: re.compile(rf"""["']?{key}["']?\s*:\s*""", re.IGNORECASE) for key in ANSWER_KEYS
}
_PYTHON_WORDS: Final = {"True": "true", "False": "false", "None": "null"}
_JSON_WORDS: Final = {"true": "True", "false": "False", "null": "None"}
_BARE_PERCENT_RE: Final = re.compile(r"-?\d+(?:\.\d+)?\s*%")
_YAML_ERRORS: Final = (yaml.YAMLError, ValueError, TypeError, RecursionError)
_LITERAL_ERRORS: Final = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)


@dataclass(frozen=True, slots=True)
class ParsedAnswer:
    """A validated answer, or why there is none: exactly one of `answer` and `error` is set."""

    answer: dict[str, Any] | None
    error: str

    @property
    def ok(self) -> bool:
        """Whether an answer was parsed."""
        return self.answer is not None


# ---------------------------------------------------------------------------------------------
# Single parsers: each returns a dict or None, never raises
# ---------------------------------------------------------------------------------------------


def _as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _json(text: str) -> dict[str, Any] | None:
    try:
        # strict=False: raw newlines inside strings are common in model output.
        return _as_dict(json.loads(text, strict=False))
    except (ValueError, RecursionError):
        return None


def _yaml(text: str) -> dict[str, Any] | None:
    try:
        return _as_dict(yaml.safe_load(text))
    except _YAML_ERRORS:
        return None


def _literal(text: str) -> dict[str, Any] | None:
    try:
        return _as_dict(ast.literal_eval(_swap_words(text, _JSON_WORDS)))
    except _LITERAL_ERRORS:
        return None


def _repaired_json(text: str) -> dict[str, Any] | None:
    return _json(repair_json(text))


# ---------------------------------------------------------------------------------------------
# Scanning helpers (string-aware)
# ---------------------------------------------------------------------------------------------


def _string_end(text: str, start: int) -> int:
    """Index just past the double-quoted string opening at `start` (or len(text))."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return len(text)


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the bracket block opening at `start`; None when it never closes."""
    closing = {"{": "}", "[": "]"}
    stack: list[str] = []
    i = start
    while i < len(text):
        char = text[i]
        if char == '"':
            i = _string_end(text, i)
            continue
        if char in closing:
            stack.append(closing[char])
        elif char in "}]":
            if not stack or stack.pop() != char:
                return None
            if not stack:
                return i + 1
        i += 1
    return None


def _swap_words(text: str, words: dict[str, str]) -> str:
    """Replace bare words (outside quoted strings) using `words`."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "\"'":
            end = _string_end(text, i) if char == '"' else _single_quoted_end(text, i) + 1
            out.append(text[i:end])
            i = end
            continue
        if char.isalpha() and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            j = i
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            out.append(words.get(word, word))
            i = j
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _single_quoted_end(text: str, start: int) -> int:
    """Index of the closing quote of a single-quoted string opening at `start`.

    A quote closes the string only when followed (after spaces) by `,:}]` or the end, so
    apostrophes as in 'customer's bag' stay inside the string.
    """
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "'":
            rest = text[i + 1 :].lstrip()
            if not rest or rest[0] in ",:}]":
                return i
        i += 1
    return len(text)


def repair_json(text: str) -> str:
    """Best-effort JSON from near-JSON.

    Single-quoted strings become double-quoted, True/False/None become true/false/null,
    trailing commas go, and bare `85%` is quoted. Text inside double-quoted strings is
    left alone. Returns the repaired text, which may still be invalid JSON.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == '"':
            end = _string_end(text, i)
            out.append(text[i:end])
            i = end
        elif char == "'":
            end = _single_quoted_end(text, i)
            body = text[i + 1 : end].replace("\\'", "'")
            # Escape unescaped double quotes that were legal inside single quotes.
            body = re.sub(r'(?<!\\)"', r"\"", body)
            out.append(f'"{body}"')
            i = end + 1
        elif char == ",":
            rest = text[i + 1 :].lstrip()
            if not rest or rest[0] not in "}]":
                out.append(char)
            i += 1
        elif char.isdigit() or char == "-":
            match = _BARE_PERCENT_RE.match(text, i)
            if match and (i == 0 or not text[i - 1].isalnum()):
                out.append(f'"{match.group(0)}"')
                i = match.end()
            else:
                out.append(char)
                i += 1
        else:
            out.append(char)
            i += 1
    return _swap_words("".join(out), _PYTHON_WORDS)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def _segments(text: str) -> list[str]:
    """Texts to try, most specific first: fenced blocks, the text without fences, the raw text."""
    fenced = [m.group(1).strip() for m in _FENCE_RE.finditer(text)]
    unfenced = _FENCE_RE.sub(lambda m: m.group(1), text).strip()
    segments: list[str] = []
    for segment in (*fenced, unfenced, text.strip()):
        if segment and segment not in segments:
            segments.append(segment)
    return segments


def _object_slices(text: str) -> list[str]:
    """The first balanced `{...}` and the first-`{`-to-last-`}` slice (the former service's way)."""
    first = text.find("{")
    if first < 0:
        return []
    slices: list[str] = []
    end = _balanced_end(text, first)
    if end is not None:
        slices.append(text[first:end])
    last = text.rfind("}")
    if last > first and text[first : last + 1] not in slices:
        slices.append(text[first : last + 1])
    return slices


def extract_json_regex_fields(text: str) -> dict[str, Any] | None:
    """The three answer fields found one by one (the former service's field regexes).

    Each key's value must be a complete `{...}`/`[...]` block that one of the parsers reads;
    fields that are missing or cut off are left out. None when no field was read.
    """
    found: dict[str, Any] = {}
    for key, pattern in _FIELD_RE.items():
        for match in pattern.finditer(text):
            start = match.end()
            if start >= len(text) or text[start] not in "{[":
                continue
            end = _balanced_end(text, start)
            if end is None:
                continue
            block = text[start:end]
            value = _parse_value(block)
            if value is not None:
                found[key] = value
                break
    return found or None


def _parse_value(block: str) -> Any:
    """A `{...}` or `[...]` block through json, repair, Python literal and YAML; None if none."""
    for attempt in (block, repair_json(block)):
        try:
            return json.loads(attempt, strict=False)
        except (ValueError, RecursionError):
            pass
    try:
        return ast.literal_eval(_swap_words(block, _JSON_WORDS))
    except _LITERAL_ERRORS:
        pass
    try:
        return yaml.safe_load(block)
    except _YAML_ERRORS:
        return None


def iter_json_candidates(text: str) -> Iterator[dict[str, Any]]:
    """Every dict the strategies above read from `text`, in the order they are tried.

    Lazy, so a clean answer costs one `json.loads`.
    """
    text = text[:MAX_TEXT_CHARS]
    for segment in _segments(text):
        for parser in (_json, _yaml):
            candidate = parser(segment)
            if candidate is not None:
                yield candidate
        for sliced in _object_slices(segment):
            for parser in (_json, _literal, _yaml, _repaired_json):
                candidate = parser(sliced)
                if candidate is not None:
                    yield candidate
    fields = extract_json_regex_fields(text)
    if fields is not None:
        yield fields


def _looks_like_answer(candidate: dict[str, Any]) -> bool:
    return any(key in candidate for key in ANSWER_KEYS)


def extract_json(text: str) -> dict[str, Any] | None:
    """The model's answer object from raw text, or None when no dict can be read.

    Returns the first candidate holding one of `ANSWER_KEYS`, else the first dict found.
    The result is not validated; see `parse_answer`.
    """
    first: dict[str, Any] | None = None
    for candidate in iter_json_candidates(text):
        if _looks_like_answer(candidate):
            return candidate
        if first is None:
            first = candidate
    return first


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@cache
def _validator() -> Draft202012Validator:
    """Compiled once per process: compiling the schema per answer would dominate parsing."""
    schema = model_answer_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_answer(obj: Any) -> str | None:
    """None when `obj` meets `schemas/json/model_answer.schema.json`, else the error.

    The error is the most relevant one, as "path: message", cut to `MAX_ERROR_CHARS`.
    """
    error = best_match(_validator().iter_errors(obj))
    if error is None:
        return None
    path = "/".join(str(part) for part in error.absolute_path) or "(root)"
    return f"{path}: {error.message}"[:MAX_ERROR_CHARS]


def parse_answer(text: str) -> ParsedAnswer:
    """Extract and validate the answer in `text`.

    Returns the first candidate (in `iter_json_candidates` order) that validates. Otherwise
    the error is the validation message of the first answer-like candidate (or of the first
    dict), or `NO_JSON_ERROR` when no dict was found. Never raises.
    """
    first_error: str | None = None
    first_is_answer_like = False
    for candidate in iter_json_candidates(text):
        error = validate_answer(candidate)
        if error is None:
            return ParsedAnswer(candidate, "")
        answer_like = _looks_like_answer(candidate)
        if first_error is None or (answer_like and not first_is_answer_like):
            first_error, first_is_answer_like = error, answer_like
    return ParsedAnswer(None, first_error or NO_JSON_ERROR)
