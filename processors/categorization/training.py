"""Train and evaluate the categorizer's artifacts.

Training data is a CSV with the columns `title`, `description`, `image`, `category`.
`image` is a local file path, relative to the CSV's folder or absolute, or empty for
a listing without a photo; URLs are refused (download images first: training must be
reproducible offline). A row whose image cannot be opened counts as a row without an
image. Rows with neither text nor image are skipped and counted.

`train_categorizer` embeds every row (batched, with a tqdm bar), splits off a
stratified held-out test set (or uses `test_csv`), fits one head per modality (see
`processors.categorization.categorizer`: combined, text-only, image-only, each a
`StandardScaler` and a `LogisticRegression`), a `LabelEncoder` and a `TfidfVectorizer`
for tags, and reports held-out accuracy for each head separately, next to the
majority-class baseline, so that template text is never mistaken for skill. It writes
the joblib artifacts, manifest.json (encoders, dimensions, labels, UTC training time,
metrics, scikit-learn version) and confusion_matrix.png.

Command line: `python -m processors.categorization train|evaluate --help`.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from processors.categorization.categorizer import (
    HEAD_COMBINED,
    HEAD_IMAGE,
    HEAD_TEXT,
    MANIFEST,
    Categorizer,
    Head,
    head_features,
    save_artifacts,
)
from processors.categorization.encoders import (
    IMAGE_DECODE_ERRORS,
    IMAGE_ENCODER_NAMES,
    ImageEncoder,
    ImageEncoderSettings,
    TextEncoder,
    TextEncoderSettings,
    build_image_encoder,
    compose_text,
    square_resize,
)

log = logging.getLogger(__name__)

CONFUSION_PNG = "confusion_matrix.png"
REQUIRED_COLUMNS = ("title", "description", "image", "category")
HEAD_ORDER = (HEAD_IMAGE, HEAD_TEXT, HEAD_COMBINED)
# Tags are words of letters, optionally hyphenated ("t-shirt"); no numbers.
TAG_WORD_PATTERN = r"(?u)\b[^\W\d_][^\W\d_-]*(?:-[^\W\d_]+)*\b"


class TrainingDataError(ValueError):
    """The training or test CSV is unusable (missing columns, URL images, no rows)."""


@dataclass(frozen=True, slots=True)
class Row:
    """One listing of a training CSV, with its image path resolved."""

    text: str
    image_path: Path | None
    category: str


@dataclass(frozen=True, slots=True)
class HeadMetrics:
    """Held-out accuracy of one head, over the `n` test rows it can categorize."""

    head: str
    accuracy: float
    n: int


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    """Accuracy per head on a test set, the majority baseline, and the confusion matrix.

    `heads` maps head name to metrics; a head absent from the artifacts or with no
    test row it can categorize is missing. `confusion` is for `confusion_head`
    (combined when present, else image, else text); rows are true labels, columns
    predictions, both in `labels` order.
    """

    labels: tuple[str, ...]
    heads: dict[str, HeadMetrics]
    majority_baseline: float
    test_rows: int
    confusion_head: str
    confusion: list[list[int]]

    def summary(self) -> str:
        """One line per head, e.g. "image-only accuracy 0.9012 (n=10000)"."""
        names = {HEAD_IMAGE: "image-only", HEAD_TEXT: "text-only", HEAD_COMBINED: "combined"}
        lines = [
            f"{names[h]:>10} accuracy {m.accuracy:.4f} (n={m.n})"
            for h in HEAD_ORDER
            if (m := self.heads.get(h)) is not None
        ]
        lines.append(f"{'majority':>10} baseline {self.majority_baseline:.4f}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class TrainingReport:
    """What `train_categorizer` produced and measured."""

    out_dir: Path
    model_version: str
    train_rows: int
    skipped_rows: int
    evaluation: EvaluationReport
    embed_seconds: float
    images_per_second: float
    texts_per_second: float
    fit_seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)


def read_rows(csv_path: Path) -> list[Row]:
    """Parse a training CSV. Raises `TrainingDataError` for missing columns or URL images."""
    try:
        handle = csv_path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TrainingDataError(f"cannot open {csv_path}: {exc}") from exc
    with handle:
        reader = csv.DictReader(handle)
        missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise TrainingDataError(f"{csv_path} lacks columns: {', '.join(sorted(missing))}")
        rows: list[Row] = []
        for line, record in enumerate(reader, start=2):
            category = (record["category"] or "").strip()
            if not category:
                raise TrainingDataError(f"{csv_path}:{line}: empty category")
            image = (record["image"] or "").strip()
            if "://" in image:
                raise TrainingDataError(
                    f"{csv_path}:{line}: image {image!r} is a URL; training reads local files only"
                )
            path = None
            if image:
                path = Path(image) if Path(image).is_absolute() else csv_path.parent / image
            text = compose_text(record["title"] or "", record["description"] or "")
            rows.append(Row(text, path, category))
    if not rows:
        raise TrainingDataError(f"{csv_path} has no rows")
    return rows


def _open_image(path: Path | None, size: int) -> Image.Image | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            return square_resize(image, size)
    except IMAGE_DECODE_ERRORS as exc:  # a bad file makes the row image-less, not the run fail
        log.warning("image %s unusable: %s", path, exc)
        return None


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


@dataclass(slots=True)
class Embedded:
    """Embeddings of a list of rows; a row's text/image row is -1 when unusable."""

    text: np.ndarray
    image: np.ndarray
    text_index: np.ndarray
    image_index: np.ndarray
    text_seconds: float
    image_seconds: float


def embed_rows(
    rows: Sequence[Row],
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    *,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "embedding",
) -> Embedded:
    """Embed the usable texts and images of `rows`, `batch_size` rows per forward pass."""
    from tqdm import tqdm

    text_parts: list[np.ndarray] = []
    image_parts: list[np.ndarray] = []
    text_index = np.full(len(rows), -1, dtype=np.int64)
    image_index = np.full(len(rows), -1, dtype=np.int64)
    n_text = n_image = 0
    text_seconds = image_seconds = 0.0
    with tqdm(total=len(rows), desc=desc, unit="row", disable=not progress) as bar:
        for chunk in _chunks(len(rows), batch_size):
            texts = [(i, rows[i].text) for i in chunk if rows[i].text]
            if texts:
                started = time.perf_counter()
                text_parts.append(text_encoder.encode([t for _, t in texts]))
                text_seconds += time.perf_counter() - started
                for i, _ in texts:
                    text_index[i] = n_text
                    n_text += 1
            images = [
                (i, im)
                for i in chunk
                if (im := _open_image(rows[i].image_path, image_encoder.input_size)) is not None
            ]
            if images:
                started = time.perf_counter()
                image_parts.append(image_encoder.encode([im for _, im in images]))
                image_seconds += time.perf_counter() - started
                for i, _ in images:
                    image_index[i] = n_image
                    n_image += 1
            bar.update(len(chunk))
    return Embedded(
        text=np.concatenate(text_parts)
        if text_parts
        else np.zeros((0, text_encoder.dim), np.float32),
        image=np.concatenate(image_parts)
        if image_parts
        else np.zeros((0, image_encoder.dim), np.float32),
        text_index=text_index,
        image_index=image_index,
        text_seconds=text_seconds,
        image_seconds=image_seconds,
    )


def _select(embedded: Embedded, rows: np.ndarray, head: str) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (into `rows`) usable by `head`, and the head's features for them."""
    has_text = embedded.text_index[rows] >= 0
    has_image = embedded.image_index[rows] >= 0
    mask = {HEAD_TEXT: has_text, HEAD_IMAGE: has_image, HEAD_COMBINED: has_text & has_image}[head]
    picked = rows[mask]
    text = embedded.text[embedded.text_index[picked]] if head != HEAD_IMAGE else None
    image = embedded.image[embedded.image_index[picked]] if head != HEAD_TEXT else None
    return np.flatnonzero(mask), head_features(head, text, image)


def _fit_head(name: str, features: np.ndarray, y: np.ndarray, *, max_iter: int, seed: int) -> Head:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    classifier = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        classifier.fit(scaler.transform(features), y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("head %s: LogisticRegression stopped at max_iter=%d", name, max_iter)
    return Head(name, scaler, classifier)


def evaluate_heads(
    heads: dict[str, Head],
    embedded: Embedded,
    rows: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str],
    majority_label: int,
) -> EvaluationReport:
    """Accuracy of each head on the test `rows` it can categorize (`y`: encoded labels)."""
    metrics: dict[str, HeadMetrics] = {}
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in HEAD_ORDER:
        head = heads.get(name)
        if head is None:
            continue
        positions, features = _select(embedded, rows, name)
        if len(positions) == 0:
            continue
        predicted = head.predict_proba(features, len(labels)).argmax(axis=1)
        truth = y[positions]
        metrics[name] = HeadMetrics(name, float(np.mean(predicted == truth)), len(positions))
        predictions[name] = (truth, predicted)
    confusion_head = next(
        (h for h in (HEAD_COMBINED, HEAD_IMAGE, HEAD_TEXT) if h in predictions), ""
    )
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    if confusion_head:
        truth, predicted = predictions[confusion_head]
        np.add.at(matrix, (truth, predicted), 1)
    return EvaluationReport(
        labels=tuple(labels),
        heads=metrics,
        majority_baseline=float(np.mean(y == majority_label)) if len(y) else 0.0,
        test_rows=len(rows),
        confusion_head=confusion_head,
        confusion=matrix.tolist(),
    )


def plot_confusion(report: EvaluationReport, path: Path, title: str) -> None:
    """Write the confusion matrix (counts, row-normalized colours) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    matrix = np.asarray(report.confusion, dtype=float)
    normalized = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(report.labels)
    figure = Figure(figsize=(2.0 + 0.75 * n, 1.5 + 0.7 * n), dpi=110)
    axes = figure.add_subplot()
    axes.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(n), report.labels, rotation=45, ha="right")
    axes.set_yticks(range(n), report.labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            axes.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if normalized[i, j] > 0.5 else "black",
            )
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def _stratified_split(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    train, test = train_test_split(
        indices, test_size=test_size, random_state=seed, stratify=stratify
    )
    return np.sort(train), np.sort(test)


def _fit_tfidf(texts: Sequence[str]) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from processors.categorization.categorizer import TFIDF_MAX_CHARS

    corpus = [t[:TFIDF_MAX_CHARS] for t in texts if t]
    if not corpus:
        return None
    vectorizer = TfidfVectorizer(
        stop_words="english",
        token_pattern=TAG_WORD_PATTERN,
        min_df=1,
        max_features=50_000,
        sublinear_tf=True,
    )
    try:
        vectorizer.fit(corpus)
    except ValueError:  # only stop words / no letters: no tags
        return None
    return vectorizer


def train_categorizer(
    data_csv: Path,
    out_dir: Path,
    *,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    test_csv: Path | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    max_iter: int = 1000,
    embed_batch_size: int = 256,
    now: Callable[[], datetime] | None = None,
) -> TrainingReport:
    """Train all heads on `data_csv`, evaluate, and write the artifacts to `out_dir`.

    Held-out data: `test_csv` when given (all of `data_csv` trains), else a stratified
    `test_size` split of `data_csv` drawn with `seed`. Heads are fitted on the training
    rows that have their inputs; a head with fewer than two classes of such rows is
    left out (e.g. no text → image head only). Loads the encoders if needed.

    Raises `TrainingDataError` for unusable CSVs or when no head can be trained,
    `EncoderLoadError` when an encoder cannot load.
    """
    from sklearn.preprocessing import LabelEncoder

    rows = read_rows(data_csv)
    test_rows_list = read_rows(test_csv) if test_csv is not None else []
    text_encoder.load()
    image_encoder.load()
    started = time.perf_counter()
    embedded = embed_rows(
        rows + test_rows_list,
        text_encoder,
        image_encoder,
        batch_size=embed_batch_size,
        progress=progress,
    )
    embed_seconds = time.perf_counter() - started
    usable = (embedded.text_index >= 0) | (embedded.image_index >= 0)
    skipped = int((~usable).sum())
    all_rows = rows + test_rows_list
    label_encoder = LabelEncoder().fit(
        [r.category for r, ok in zip(all_rows, usable, strict=True) if ok]
    )
    y_all = np.full(len(all_rows), -1, dtype=np.int64)
    y_all[usable] = label_encoder.transform(
        [r.category for r, ok in zip(all_rows, usable, strict=True) if ok]
    )
    kept = np.flatnonzero(usable)
    if test_csv is not None:
        train_idx = kept[kept < len(rows)]
        test_idx = kept[kept >= len(rows)]
    else:
        train_pos, test_pos = _stratified_split(y_all[kept], test_size, seed)
        train_idx, test_idx = kept[train_pos], kept[test_pos]

    fit_started = time.perf_counter()
    heads: dict[str, Head] = {}
    for name in HEAD_ORDER:
        positions, features = _select(embedded, train_idx, name)
        y = y_all[train_idx][positions]
        if len(np.unique(y)) < 2:
            log.info("head %s: fewer than two classes with its inputs; not trained", name)
            continue
        heads[name] = _fit_head(name, features, y, max_iter=max_iter, seed=seed)
    if not heads:
        raise TrainingDataError(f"{data_csv}: no head could be trained (too few usable rows)")
    tfidf = _fit_tfidf([all_rows[i].text for i in train_idx])
    fit_seconds = time.perf_counter() - fit_started

    labels = [str(c) for c in label_encoder.classes_]
    majority = int(np.bincount(y_all[train_idx], minlength=len(labels)).argmax())
    evaluation = evaluate_heads(heads, embedded, test_idx, y_all[test_idx], labels, majority)

    trained_at = (now or (lambda: datetime.now(UTC)))().astimezone(UTC)
    n_images = int((embedded.image_index >= 0).sum())
    n_texts = int((embedded.text_index >= 0).sum())
    manifest = save_artifacts(
        out_dir,
        label_encoder=label_encoder,
        tfidf=tfidf,
        heads=heads,
        trained_at=trained_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        manifest={
            "text_encoder": text_encoder.describe(),
            "image_encoder": image_encoder.describe(),
            "feature_dims": {
                HEAD_TEXT: text_encoder.dim,
                HEAD_IMAGE: image_encoder.dim,
                HEAD_COMBINED: text_encoder.dim + image_encoder.dim,
            },
            "sklearn_version": _sklearn_version(),
            "training": {
                "data_csv": str(data_csv),
                "test_csv": str(test_csv) if test_csv else None,
                "test_size": None if test_csv else test_size,
                "seed": seed,
                "train_rows": len(train_idx),
                "test_rows": len(test_idx),
                "skipped_rows": skipped,
                "rows_with_text": n_texts,
                "rows_with_image": n_images,
                "classifier": f"LogisticRegression(max_iter={max_iter})",
                "embed_seconds": round(embed_seconds, 1),
                "images_per_second": round(n_images / max(embedded.image_seconds, 1e-9), 1),
            },
            "metrics": _metrics_dict(evaluation, labels[majority]),
        },
    )
    plot_confusion(
        evaluation,
        out_dir / CONFUSION_PNG,
        f"{manifest['model_version']}\n{evaluation.confusion_head} head, "
        f"held-out n={sum(map(sum, evaluation.confusion))}",
    )
    return TrainingReport(
        out_dir=out_dir,
        model_version=str(manifest["model_version"]),
        train_rows=len(train_idx),
        skipped_rows=skipped,
        evaluation=evaluation,
        embed_seconds=embed_seconds,
        images_per_second=n_images / max(embedded.image_seconds, 1e-9),
        texts_per_second=n_texts / max(embedded.text_seconds, 1e-9),
        fit_seconds=fit_seconds,
        manifest=manifest,
    )


def evaluate(
    artifact_dir: Path,
    test_csv: Path,
    *,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder,
    progress: bool = True,
    embed_batch_size: int = 256,
) -> EvaluationReport:
    """Accuracy of trained artifacts on `test_csv`, per head (same figures as training).

    Raises what `Categorizer.load` and `read_rows` raise; labels unknown to the
    artifacts raise `TrainingDataError`.
    """
    categorizer = Categorizer.load(artifact_dir, text_encoder, image_encoder)
    rows = read_rows(test_csv)
    unknown = {r.category for r in rows} - set(categorizer.labels)
    if unknown:
        raise TrainingDataError(f"{test_csv}: labels unknown to the artifacts: {sorted(unknown)}")
    text_encoder.load()
    image_encoder.load()
    embedded = embed_rows(
        rows, text_encoder, image_encoder, batch_size=embed_batch_size, progress=progress
    )
    usable = np.flatnonzero((embedded.text_index >= 0) | (embedded.image_index >= 0))
    index = {label: i for i, label in enumerate(categorizer.labels)}
    y = np.array([index[rows[i].category] for i in usable], dtype=np.int64)
    majority_name = categorizer.manifest.get("metrics", {}).get("majority_label")
    majority = index.get(majority_name, int(np.bincount(y).argmax()) if len(y) else 0)
    return evaluate_heads(categorizer.heads, embedded, usable, y, categorizer.labels, majority)


def _metrics_dict(report: EvaluationReport, majority_label: str) -> dict[str, Any]:
    return {
        "majority_label": majority_label,
        "accuracy": {h: round(m.accuracy, 4) for h, m in report.heads.items()},
        "test_rows_per_head": {h: m.n for h, m in report.heads.items()},
        "majority_baseline": round(report.majority_baseline, 4),
        "test_rows": report.test_rows,
        "confusion_head": report.confusion_head,
        "confusion": report.confusion,
        "heads_detail": [asdict(m) for m in report.heads.values()],
    }


def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `train` artifacts or `evaluate` them on a test CSV."""
    parser = argparse.ArgumentParser(prog="python -m processors.categorization")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--image-encoder", choices=IMAGE_ENCODER_NAMES, default="efficientnet-lite0")
        p.add_argument("--image-weights", type=Path, default=None)
        p.add_argument("--image-size", type=int, default=224)
        p.add_argument("--device", default="cpu")
        p.add_argument("--embed-batch-size", type=int, default=256)
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "train":
            p.add_argument("--data", type=Path, required=True)
            p.add_argument("--out", type=Path, required=True)
            p.add_argument("--test-csv", type=Path, default=None)
            p.add_argument("--test-size", type=float, default=0.2)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--max-iter", type=int, default=1000)
        else:
            p.add_argument("--artifacts", type=Path, required=True)
            p.add_argument("--test-csv", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.device.startswith("cuda"):
        import torch

        # Keep GPU features numerically close to the CPU workers' (no TF32 convolutions).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    text_encoder = TextEncoder(TextEncoderSettings(device=args.device))
    image_encoder = build_image_encoder(
        ImageEncoderSettings(
            name=args.image_encoder,
            weights_path=args.image_weights,
            input_size=args.image_size,
            device=args.device,
        )
    )
    if args.command == "train":
        report = train_categorizer(
            args.data,
            args.out,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            test_csv=args.test_csv,
            test_size=args.test_size,
            seed=args.seed,
            progress=not args.quiet,
            max_iter=args.max_iter,
            embed_batch_size=args.embed_batch_size,
        )
        print(f"model_version {report.model_version}")
        print(
            f"train rows {report.train_rows}, skipped {report.skipped_rows}; "
            f"embedding {report.embed_seconds:.0f} s ({report.images_per_second:.1f} images/s, "
            f"{report.texts_per_second:.1f} texts/s); fitting {report.fit_seconds:.0f} s"
        )
        print(report.evaluation.summary())
        print(f"artifacts: {args.out} ({MANIFEST}, {CONFUSION_PNG})")
        return 0
    evaluation = evaluate(
        args.artifacts,
        args.test_csv,
        text_encoder=text_encoder,
        image_encoder=image_encoder,
        progress=not args.quiet,
        embed_batch_size=args.embed_batch_size,
    )
    print(evaluation.summary())
    return 0
