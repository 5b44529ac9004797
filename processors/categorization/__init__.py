"""Product categorization: encoders, trained artifacts, batch prediction and training.

Public surface (everything else is internal):

- encoders: `TextEncoder`, `ImageEncoder` (protocol), `EfficientNetLite0Encoder`,
  `ResNet50Encoder`, `build_image_encoder`, `TextEncoderSettings`,
  `ImageEncoderSettings`, `EncoderLoadError`;
- prediction: `Categorizer` (`Categorizer.load(...)`, `predict_batch(...)`),
  `ArtifactError`, `ArtifactMismatchError`;
- a micro-batch: `CategorizationService` (fetch the images, then predict);
- training: `train_categorizer`, `evaluate`, `TrainingReport`, `EvaluationReport`,
  `HeadMetrics`, `TrainingDataError`;
- data: `convert_fashion_mnist`, `FASHION_MNIST_CLASSES`.

Importing this package loads no model and reads no environment variable.
"""

from processors.categorization.categorizer import (
    ArtifactError,
    ArtifactMismatchError,
    Categorizer,
)
from processors.categorization.encoders import (
    EFFICIENTNET_LITE0,
    IMAGE_ENCODER_NAMES,
    RESNET50,
    EfficientNetLite0Encoder,
    EncoderLoadError,
    ImageEncoder,
    ImageEncoderSettings,
    ResNet50Encoder,
    TextEncoder,
    TextEncoderSettings,
    build_image_encoder,
)
from processors.categorization.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from processors.categorization.fashion_mnist import convert_fashion_mnist
from processors.categorization.service import CategorizationService
from processors.categorization.training import (
    EvaluationReport,
    HeadMetrics,
    TrainingDataError,
    TrainingReport,
    evaluate,
    train_categorizer,
)

__all__ = [
    "EFFICIENTNET_LITE0",
    "FASHION_MNIST_CLASSES",
    "IMAGE_ENCODER_NAMES",
    "RESNET50",
    "ArtifactError",
    "ArtifactMismatchError",
    "CategorizationService",
    "Categorizer",
    "EfficientNetLite0Encoder",
    "EncoderLoadError",
    "EvaluationReport",
    "HeadMetrics",
    "ImageEncoder",
    "ImageEncoderSettings",
    "ResNet50Encoder",
    "TextEncoder",
    "TextEncoderSettings",
    "TrainingDataError",
    "TrainingReport",
    "build_image_encoder",
    "convert_fashion_mnist",
    "evaluate",
    "train_categorizer",
]
