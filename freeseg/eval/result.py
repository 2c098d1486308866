"""``EvalResult``: what one evaluation run scored, and its JSON summary.

Made by ``freeseg.eval.evaluate.evaluate``, written out by ``freeseg.eval.reports``. Scores are
fractions in 0..1; NaN marks an undefined value (JSON ``null``, via ``json_number``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["EvalResult", "json_number"]


@dataclass
class EvalResult:
    """Scores of one run. Per-class arrays are ``[C]`` float64 in 0..1, NaN = undefined.

    Attributes:
        class_names: the C class names.
        miou: standard dataset-level mIoU.
        miou_per_image: official per-image-averaged mIoU.
        iou: dataset-level IoU per class.
        iou_per_image: per class, mean IoU over the images whose GT contains the class.
        images_with_class: ``[C]`` int, images whose GT contains the class.
        pixel_accuracy: correct / scored pixels over the split.
        confusion: ``[C, C+1]`` int64 summed confusion matrix (last column: void predictions).
        image_miou: stem -> that image's mIoU (NaN when it has no scored pixel).
        protocol: "standard" (both metrics with ``official_boundary``'s handling of 255) or
            "paper" (``miou``/``iou``/``confusion`` with 255 ignored, the per-image values with
            255 scored as background, as the official code).
        n_scored / n_cached: images scored now / taken from the cache.
    """

    dataset: str
    split: str
    class_names: tuple[str, ...]
    miou: float
    miou_per_image: float
    iou: np.ndarray
    iou_per_image: np.ndarray
    images_with_class: np.ndarray
    pixel_accuracy: float
    confusion: np.ndarray
    image_miou: dict[str, float]
    official_boundary: bool
    source: str
    settings_hash: str
    protocol: str = "standard"
    n_scored: int = 0
    n_cached: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.image_miou)

    def to_json(self) -> dict[str, Any]:
        """``{"miou", "miou_per_image", "per_class_iou": {name: IoU or None}}`` (0..1)."""
        return {
            "miou": json_number(self.miou),
            "miou_per_image": json_number(self.miou_per_image),
            "per_class_iou": {n: json_number(v) for n, v in zip(self.class_names, self.iou)},
        }


def json_number(value: float) -> Optional[float]:
    """float, or None for NaN (JSON null)."""
    value = float(value)
    return None if math.isnan(value) else value
