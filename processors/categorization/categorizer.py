"""Categorize product listings from text and image with trained artifacts.

The model is the one of the category API this replaces (docs/former-service.md): a sentence
embedding of "title description" and an image embedding, concatenated, standardized
(`StandardScaler`) and classified (`LogisticRegression`), with a `LabelEncoder` for
the names and a `TfidfVectorizer` whose top terms are the tags.

Missing modality. A listing may come without a usable image (none, or one that does
not decode) or without text. Instead of filling the missing half with zeros or means,
which the combined classifier never saw in training, the artifacts hold up to three
heads, each a scaler and a classifier trained on its own features:

- `combined` (text + image; files `scaler.joblib`, `classifier.joblib`, the former service's
  names), used when both are usable;
- `text` (`scaler_text.joblib`, `classifier_text.joblib`), when only text is;
- `image` (`scaler_image.joblib`, `classifier_image.joblib`), when only the image is.

`CategoryTag.used_text` / `used_image` say which features decided the category. A
head is absent when training had no data for it (e.g. Fashion-MNIST with empty text
has only the image head); a listing that needs a missing head falls back to the other
usable modality, and one with nothing usable is a `Failure(NO_USABLE_INPUT)`. Tags
come from the text whichever head decided, and are empty without text.

Start-up (`Categorizer.load`) reads manifest.json, checks the artifact files against
their recorded SHA-256, and checks that the configured encoders are the ones the
artifacts were trained with (name, dimension, image input size): a mismatch raises
`ArtifactMismatchError` once, at start, never per event. Artifacts are joblib pickles:
load only artifacts you trained; the hash check catches changed files, not malice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from PIL import Image

from processors.categorization.encoders import (
    ENCODER_ERRORS,
    IMAGE_DECODE_ERRORS,
    ImageEncoder,
    TextEncoder,
    compose_text,
    square_resize,
)
from processors.errors import ErrorCode, Failure, failure_from_exception
from processors.records import CategoryTag, ProductListing, SourcePosition, TopCategory

log = logging.getLogger(__name__)

STAGE = "categorize"
MANIFEST = "manifest.json"
LABEL_ENCODER_FILE = "label_encoder.joblib"
TFIDF_FILE = "tfidf.joblib"
HEAD_COMBINED = "combined"
HEAD_TEXT = "text"
HEAD_IMAGE = "image"
HEAD_FILES: dict[str, tuple[str, str]] = {
    HEAD_COMBINED: ("scaler.joblib", "classifier.joblib"),
    HEAD_TEXT: ("scaler_text.joblib", "classifier_text.joblib"),
    HEAD_IMAGE: ("scaler_image.joblib", "classifier_image.joblib"),
}
TOP_N = 3
# Characters of "title description" that TF-IDF tags are taken from.
TFIDF_MAX_CHARS = 20_000
MANIFEST_FORMAT = 1


class ArtifactError(RuntimeError):
    """The artifact directory is missing, incomplete, unreadable or was changed."""


class ArtifactMismatchError(ArtifactError):
    """The artifacts were trained with other encoders than the worker is configured with."""


@dataclass(frozen=True, slots=True)
class Head:
    """One scaler + classifier over one feature layout (`combined`, `text` or `image`)."""

    name: str
    scaler: Any
    classifier: Any

    def predict_proba(self, features: np.ndarray, n_labels: int) -> np.ndarray:
        """(n, n_labels) probabilities, columns in label-encoder order.

        A head trained on a subset of the labels gets probability 0 for the others.
        """
        raw = self.classifier.predict_proba(self.scaler.transform(features))
        probs = np.zeros((features.shape[0], n_labels), dtype=np.float64)
        probs[:, np.asarray(self.classifier.classes_, dtype=int)] = raw
        return probs


def head_features(head: str, text: np.ndarray | None, image: np.ndarray | None) -> np.ndarray:
    """The feature matrix of `head`: text, image, or text then image side by side."""
    if head == HEAD_TEXT and text is not None:
        return text
    if head == HEAD_IMAGE and image is not None:
        return image
    if head == HEAD_COMBINED and text is not None and image is not None:
        return np.hstack([text, image])
    raise ValueError(f"head {head!r} needs features that were not given")


def choose_head(has_text: bool, has_image: bool, available: Mapping[str, object]) -> str | None:
    """Which head categorizes a listing with these usable inputs; None when none can.

    Both usable: the combined head, else the image head, else the text head. Text
    only: the text head, or None without one. Image only: the image head, or None.
    """
    if has_text and has_image and HEAD_COMBINED in available:
        return HEAD_COMBINED
    if has_text and HEAD_TEXT in available and not (has_image and HEAD_IMAGE in available):
        return HEAD_TEXT
    if has_image and HEAD_IMAGE in available:
        return HEAD_IMAGE
    if has_text and HEAD_TEXT in available:
        return HEAD_TEXT
    return None


_WORD = re.compile(r"\S")


def tfidf_tags(tfidf: Any, texts: Sequence[str], ks: Sequence[int]) -> list[tuple[str, ...]]:
    """The `k` highest-weighted TF-IDF terms of each text, heaviest first.

    Texts are cut to `TFIDF_MAX_CHARS`. Ties are broken alphabetically so tags are
    stable. Empty text, `k == 0`, no vectorizer or no known term give no tags.
    """
    result: list[tuple[str, ...]] = [() for _ in texts]
    wanted = [
        i for i, (t, k) in enumerate(zip(texts, ks, strict=True)) if k > 0 and _WORD.search(t)
    ]
    if tfidf is None or not wanted:
        return result
    matrix = tfidf.transform([texts[i][:TFIDF_MAX_CHARS] for i in wanted]).tocsr()
    vocabulary = tfidf.get_feature_names_out()
    for row, i in enumerate(wanted):
        start, end = matrix.indptr[row], matrix.indptr[row + 1]
        columns = matrix.indices[start:end]
        weights = matrix.data[start:end]
        terms = sorted(
            zip(weights.tolist(), (str(vocabulary[c]) for c in columns), strict=True),
            key=lambda pair: (-pair[0], pair[1]),
        )
        result[i] = tuple(term for _, term in terms[: ks[i]])
    return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_artifacts(
    out_dir: Path,
    *,
    label_encoder: Any,
    tfidf: Any,
    heads: Mapping[str, Head],
    manifest: Mapping[str, Any],
    trained_at: str,
) -> dict[str, Any]:
    """Write the joblib files and manifest.json into `out_dir`; return the manifest.

    `manifest` carries the caller's fields (encoders, metrics, training data); this
    adds the file hashes, the heads, the labels and `model_version`
    ("categorizer:<trained_at as YYYYMMDDTHHMMSSZ>:<12 hex of the files' hash>").
    `trained_at` is an ISO-8601 UTC timestamp ending in "Z".
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    joblib.dump(label_encoder, out_dir / LABEL_ENCODER_FILE)
    files[LABEL_ENCODER_FILE] = _sha256(out_dir / LABEL_ENCODER_FILE)
    if tfidf is not None:
        joblib.dump(tfidf, out_dir / TFIDF_FILE)
        files[TFIDF_FILE] = _sha256(out_dir / TFIDF_FILE)
    else:
        (out_dir / TFIDF_FILE).unlink(missing_ok=True)
    for name, (scaler_file, classifier_file) in HEAD_FILES.items():
        head = heads.get(name)
        for filename, value in (
            (scaler_file, head.scaler if head else None),
            (classifier_file, head.classifier if head else None),
        ):
            if value is None:
                (out_dir / filename).unlink(missing_ok=True)
                continue
            joblib.dump(value, out_dir / filename)
            files[filename] = _sha256(out_dir / filename)
    combined_hash = hashlib.sha256(
        "".join(f"{name}:{digest}\n" for name, digest in sorted(files.items())).encode()
    ).hexdigest()
    stamp = re.sub(r"[-:]", "", trained_at.split(".")[0].removesuffix("Z")) + "Z"
    full = dict(manifest)
    full.update(
        {
            "format": MANIFEST_FORMAT,
            "model_version": f"categorizer:{stamp}:{combined_hash[:12]}",
            "trained_at": trained_at,
            "labels": [str(label) for label in label_encoder.classes_],
            "heads": sorted(heads),
            "files": files,
            "limits": {"tfidf_max_chars": TFIDF_MAX_CHARS},
        }
    )
    (out_dir / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    """Parse manifest.json; raises `ArtifactError` when missing or not a JSON object."""
    path = artifact_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"no categorizer artifacts at {artifact_dir} ({MANIFEST} missing); train first"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{path} is not a format-{MANIFEST_FORMAT} categorizer manifest")
    return manifest


def check_encoders(
    manifest: Mapping[str, Any], text_encoder: TextEncoder, image_encoder: ImageEncoder
) -> None:
    """Raise `ArtifactMismatchError` unless the encoders match those of the manifest.

    Compared: text encoder name and dimension; image encoder name, dimension and input
    size. The message names both sides and what to do.
    """
    text = manifest.get("text_encoder") or {}
    image = manifest.get("image_encoder") or {}
    if (text.get("name"), text.get("dim")) != (text_encoder.name, text_encoder.dim):
        raise ArtifactMismatchError(
            f"artifacts were trained with text encoder {text.get('name')} ({text.get('dim')}-d) "
            f"but the worker is configured with {text_encoder.name} ({text_encoder.dim}-d); "
            "retrain or change the text encoder setting"
        )
    trained = (image.get("name"), image.get("dim"))
    configured = (image_encoder.name, image_encoder.dim)
    if trained != configured:
        raise ArtifactMismatchError(
            f"artifacts were trained with image encoder {trained[0]} ({trained[1]}-d) "
            f"but the worker is configured with {configured[0]} ({configured[1]}-d); "
            "retrain or change VS_IMAGE_ENCODER"
        )
    if image.get("input_size") != image_encoder.input_size:
        raise ArtifactMismatchError(
            f"artifacts were trained with {image_encoder.name} at "
            f"{image.get('input_size')}x{image.get('input_size')} input but the worker is "
            f"configured for {image_encoder.input_size}x{image_encoder.input_size}; "
            "retrain or change the image input size setting"
        )


class Categorizer:
    """Trained artifacts plus loaded encoders; categorizes micro-batches of listings.

    Build it with `Categorizer.load(...)`. `predict_batch` is synchronous and
    CPU-bound; run it off the event loop.
    """

    def __init__(
        self,
        *,
        manifest: Mapping[str, Any],
        label_encoder: Any,
        tfidf: Any,
        heads: Mapping[str, Head],
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
    ) -> None:
        self.manifest = dict(manifest)
        self.label_encoder = label_encoder
        self.tfidf = tfidf
        self.heads = dict(heads)
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.labels: tuple[str, ...] = tuple(str(c) for c in label_encoder.classes_)

    @property
    def model_version(self) -> str:
        """The version training recorded in manifest.json."""
        return str(self.manifest["model_version"])

    @classmethod
    def load(
        cls,
        artifact_dir: Path,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
        *,
        load_encoders: bool = True,
    ) -> Categorizer:
        """Read and verify the artifacts, check the encoders, then load the encoders.

        Raises `ArtifactError` (missing, unreadable or changed files),
        `ArtifactMismatchError` (encoders differ from training; checked before any
        weights are loaded) or `EncoderLoadError`. Encoders whose modality no head
        uses are not loaded. `load_encoders=False` leaves loading to the caller.
        """
        manifest = read_manifest(artifact_dir)
        check_encoders(manifest, text_encoder, image_encoder)
        files: Mapping[str, str] = manifest.get("files") or {}
        label_encoder = _read_artifact(artifact_dir, files, LABEL_ENCODER_FILE)
        tfidf = _read_artifact(artifact_dir, files, TFIDF_FILE) if TFIDF_FILE in files else None
        heads = _read_heads(artifact_dir, files, manifest.get("heads", []))
        _warn_on_sklearn_version(manifest)
        if load_encoders:
            if heads.keys() & {HEAD_TEXT, HEAD_COMBINED}:
                text_encoder.load()
            if heads.keys() & {HEAD_IMAGE, HEAD_COMBINED}:
                image_encoder.load()
        return cls(
            manifest=manifest,
            label_encoder=label_encoder,
            tfidf=tfidf,
            heads=heads,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
        )

    @staticmethod
    def _fail(
        results: list[CategoryTag | Failure | None],
        routes: list[str | None],
        members: Sequence[int],
        exc: BaseException,
    ) -> None:
        message = failure_from_exception(exc, STAGE).message
        log.warning("categorizer encoder failed for %d listings: %s", len(members), message)
        for i in members:
            results[i] = Failure(ErrorCode.MODEL_FAILED, message, STAGE)
            routes[i] = None

    def predict_batch(
        self,
        listings: Sequence[ProductListing],
        images: Sequence[Image.Image | None],
        *,
        idempotency_keys: Sequence[str],
        sources: Sequence[SourcePosition | None] | None = None,
    ) -> list[CategoryTag | Failure]:
        """One result per listing, in order: a `CategoryTag` or a `Failure`.

        `images[i]` is the decoded image of `listings[i]`, or None (no image, or it
        could not be fetched). An image that fails to decode here is treated as
        missing. One text forward and one image forward serve the whole batch.
        Failures: `NO_USABLE_INPUT` (no usable text or image, or none the artifacts
        have a head for), `MODEL_FAILED` (an encoder raised one of `ENCODER_ERRORS`
        for the batch; other exceptions are bugs and propagate). Raises `ValueError`
        only when the sequences' lengths differ.
        """
        n = len(listings)
        if len(images) != n or len(idempotency_keys) != n or (sources and len(sources) != n):
            raise ValueError("listings, images, idempotency_keys and sources must align")
        texts = [compose_text(item.title, item.description) for item in listings]
        prepared, image_errors = self._prepare_images(images)
        results: list[CategoryTag | Failure | None] = [None] * n
        routes = self._routes(listings, texts, prepared, image_errors, results)
        probs = self._probabilities(texts, prepared, routes, results)
        tags = tfidf_tags(
            self.tfidf,
            [texts[i] if i in probs else "" for i in range(n)],
            [item.top_k_tags for item in listings],
        )
        for i, p in probs.items():
            order = np.argsort(-p, kind="stable")[:TOP_N]
            top = tuple(TopCategory(self.labels[j], float(p[j])) for j in order)
            results[i] = CategoryTag(
                product_id=listings[i].product_id,
                category=top[0].category,
                score=top[0].prob,
                top_categories=top,
                tags=tags[i],
                model_version=self.model_version,
                idempotency_key=idempotency_keys[i],
                used_text=routes[i] in (HEAD_TEXT, HEAD_COMBINED),
                used_image=routes[i] in (HEAD_IMAGE, HEAD_COMBINED),
                source=sources[i] if sources else None,
            )
        final: list[CategoryTag | Failure] = []
        for result in results:
            if result is None:  # pragma: no cover - every route is answered above
                result = Failure(ErrorCode.INTERNAL, "listing was not categorized", STAGE)
            final.append(result)
        return final

    def _prepare_images(
        self, images: Sequence[Image.Image | None]
    ) -> tuple[list[Image.Image | None], list[str]]:
        """Each image resized for the encoder (None when absent or broken) and why not."""
        prepared: list[Image.Image | None] = []
        image_errors: list[str] = []
        for image in images:
            if image is None:
                prepared.append(None)
                image_errors.append("no image")
                continue
            try:
                prepared.append(square_resize(image, self.image_encoder.input_size))
                image_errors.append("")
            except IMAGE_DECODE_ERRORS as exc:
                prepared.append(None)
                image_errors.append(f"image did not decode ({type(exc).__name__}: {exc})")
        return prepared, image_errors

    def _routes(
        self,
        listings: Sequence[ProductListing],
        texts: Sequence[str],
        prepared: Sequence[Image.Image | None],
        image_errors: Sequence[str],
        results: list[CategoryTag | Failure | None],
    ) -> list[str | None]:
        """The head of each listing; a listing no head can take gets its failure here."""
        routes: list[str | None] = []
        for i, listing in enumerate(listings):
            route = choose_head(bool(texts[i]), prepared[i] is not None, self.heads)
            routes.append(route)
            if route is None:
                reasons = ["empty title and description" if not texts[i] else "no text head"]
                reasons.append(image_errors[i] or "no image head")
                results[i] = Failure(
                    ErrorCode.NO_USABLE_INPUT,
                    f"listing {listing.product_id}: nothing to categorize from "
                    f"({'; '.join(reasons)})",
                    STAGE,
                )
        return routes

    def _probabilities(
        self,
        texts: Sequence[str],
        prepared: Sequence[Image.Image | None],
        routes: list[str | None],
        results: list[CategoryTag | Failure | None],
    ) -> dict[int, np.ndarray]:
        """Label probabilities of every listing whose encoders ran, by listing index.

        One forward per encoder for the whole batch. An encoder failure fails the
        listings that need that encoder (their route becomes None), not the batch.
        """
        need_text = [i for i, r in enumerate(routes) if r in (HEAD_TEXT, HEAD_COMBINED)]
        need_image = [i for i, r in enumerate(routes) if r in (HEAD_IMAGE, HEAD_COMBINED)]
        text_rows = {item: row for row, item in enumerate(need_text)}
        image_rows = {item: row for row, item in enumerate(need_image)}
        text_emb = image_emb = None
        try:
            if need_text:
                text_emb = self.text_encoder.encode([texts[i] for i in need_text])
        except ENCODER_ERRORS as exc:
            self._fail(results, routes, need_text, exc)
        try:
            if need_image:
                image_emb = self.image_encoder.encode(
                    [im for im in (prepared[i] for i in need_image) if im is not None]
                )
        except ENCODER_ERRORS as exc:
            self._fail(results, routes, need_image, exc)

        probs: dict[int, np.ndarray] = {}
        for name, head in self.heads.items():
            members = [i for i, r in enumerate(routes) if r == name]
            if not members:
                continue
            text_part = (
                text_emb[[text_rows[i] for i in members]]
                if text_emb is not None and name != HEAD_IMAGE
                else None
            )
            image_part = (
                image_emb[[image_rows[i] for i in members]]
                if image_emb is not None and name != HEAD_TEXT
                else None
            )
            head_probs = head.predict_proba(
                head_features(name, text_part, image_part), len(self.labels)
            )
            for row, i in enumerate(members):
                probs[i] = head_probs[row]
        return probs


def _read_artifact(artifact_dir: Path, files: Mapping[str, str], name: str) -> Any:
    """Unpickle one listed artifact file after checking its SHA-256.

    Raises `ArtifactError` when the file is not listed, missing, changed or unreadable.
    """
    path = artifact_dir / name
    expected = files.get(name)
    if expected is None:
        raise ArtifactError(f"{name} is not listed in {artifact_dir / MANIFEST}")
    if not path.is_file():
        raise ArtifactError(f"artifact file missing: {path}")
    if _sha256(path) != expected:
        raise ArtifactError(f"{path} changed since training (SHA-256 differs)")
    try:
        return joblib.load(path)
    except Exception as exc:  # unpickling raises any type; all mean "unreadable"
        raise ArtifactError(f"cannot load {path}: {exc}") from exc


def _read_heads(
    artifact_dir: Path, files: Mapping[str, str], names: Sequence[str]
) -> dict[str, Head]:
    """The trained heads the manifest names; raises `ArtifactError` for none or unknown."""
    heads: dict[str, Head] = {}
    for name in names:
        if name not in HEAD_FILES:
            raise ArtifactError(f"unknown head {name!r} in {artifact_dir / MANIFEST}")
        scaler_file, classifier_file = HEAD_FILES[name]
        heads[name] = Head(
            name,
            _read_artifact(artifact_dir, files, scaler_file),
            _read_artifact(artifact_dir, files, classifier_file),
        )
    if not heads:
        raise ArtifactError(f"{artifact_dir} holds no trained head")
    return heads


def _warn_on_sklearn_version(manifest: Mapping[str, Any]) -> None:
    """Log a warning when the artifacts were pickled with another scikit-learn."""
    sklearn_version = _sklearn_version()
    if manifest.get("sklearn_version") != sklearn_version:
        log.warning(
            "categorizer artifacts were pickled with scikit-learn %s, running %s",
            manifest.get("sklearn_version"),
            sklearn_version,
        )


def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)
