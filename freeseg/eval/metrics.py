"""Confusion matrices and mIoU, in the two variants used to report FreeSeg-Diff.

Confusion matrix of one image (``confusion_matrix``): ``[C, C+1]`` int64, row = ground-truth
class, column = predicted class; the extra last column counts "void" predictions (value 255,
"no class"). Pixels whose ground truth is the ignore value (255) are not counted at all.
A void prediction is a miss: it adds to its ground-truth class's FN and to no class's FP.

For class c and a confusion matrix M:
    TP = M[c, c];  FN = sum(M[c, :]) - TP;  FP = sum(M[:C, c]) - TP   (column C is void)
    IoU_c = TP / (TP + FP + FN), undefined (NaN) when TP + FP + FN == 0.

Standard dataset-level mIoU (``dataset_miou``): one confusion matrix summed over every image
of the split; mIoU = mean of IoU_c over the classes with TP + FP + FN > 0, i.e. the classes
that occur in the ground truth or in the predictions somewhere in the split (a class that is
predicted but never in the ground truth counts with IoU 0). Classes absent everywhere are
left out (NaN / null). This is the usual mmsegmentation / PASCAL definition.

Per-image mIoU (``per_image_miou``), as in the official FreeSeg-Diff code
(``evaluation.py: metricsEvaluation``): for each image its own confusion matrix, IoU_c for the
classes present in that image's ground truth only (a class predicted but absent from the
image's ground truth does not enter that image's mean, though its pixels still lower the IoU
of the true class as FN), the image's mIoU = mean over those classes; then the mean over
images (NaN images, with no valid ground-truth pixel, are skipped: numpy nanmean).
``PerImageScores`` accumulates it image by image, with the per-class variant (mean IoU_c
over the images whose ground truth contains c) and the count of those images.

numpy only.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = [
    "PerImageScores", "confusion_matrix", "dataset_miou", "image_miou", "iou_per_class",
    "per_image_miou", "pixel_accuracy",
]

VOID = 255


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """Confusion matrix of one image.

    Args:
        gt: ``[H,W]`` int ground truth, values in ``[0, C)`` or ``ignore_index``.
        pred: ``[H,W]`` int prediction, values in ``[0, C)`` or 255 (void: no class).
        num_classes: C.
        ignore_index: ground-truth value of pixels that are not scored.

    Returns:
        ``[C, C+1]`` int64; rows = GT class, columns = predicted class, last column = void.

    Raises:
        ValueError: shapes differ, or a value is out of range.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    c = int(num_classes)
    gt = gt.astype(np.int64, copy=False).ravel()
    pred = pred.astype(np.int64, copy=False).ravel()
    keep = gt != ignore_index
    gt, pred = gt[keep], pred[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= c):
        bad = gt[(gt < 0) | (gt >= c)][0]
        raise ValueError(f"ground-truth value {int(bad)} outside 0..{c - 1}")
    void = pred == VOID
    if pred.size and ((pred < 0) | ((pred >= c) & ~void)).any():
        bad = pred[(pred < 0) | ((pred >= c) & ~void)][0]
        raise ValueError(f"predicted value {int(bad)} outside 0..{c - 1} (255 = void)")
    pred = np.where(void, c, pred)
    counts = np.bincount(gt * (c + 1) + pred, minlength=c * (c + 1))
    return counts.reshape(c, c + 1).astype(np.int64)


def _tp_fp_fn(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN ``[C]`` float64 of a ``[C, C+1]`` confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    c = cm.shape[0]
    if cm.shape != (c, c + 1):
        raise ValueError(f"confusion matrix must be [C, C+1], got {cm.shape}")
    tp = np.diag(cm[:, :c])
    fn = cm.sum(axis=1) - tp
    fp = cm[:, :c].sum(axis=0) - tp
    return tp, fp, fn


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU per class ``[C]`` float64 = TP / (TP + FP + FN); NaN where that is 0/0."""
    tp, fp, fn = _tp_fp_fn(cm)
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def dataset_miou(total_cm: np.ndarray) -> tuple[float, np.ndarray]:
    """Standard mIoU of a summed ``[C, C+1]`` confusion matrix: (mIoU, IoU per class ``[C]``).

    The mean runs over the classes with a defined IoU (present in GT or predictions).
    """
    iou = iou_per_class(total_cm)
    return _nanmean(iou), iou


def image_miou(cm: np.ndarray) -> float:
    """Official per-image mIoU of one image: mean IoU over classes in its ground truth.

    NaN when the image has no scored ground-truth pixel.
    """
    cm = np.asarray(cm)
    present = cm.sum(axis=1) > 0
    if not present.any():
        return float("nan")
    return _nanmean(iou_per_class(cm)[present])


def per_image_miou(cms: Iterable[np.ndarray]) -> tuple[float, np.ndarray]:
    """(nanmean over images of ``image_miou``, the per-image values ``[N]``)."""
    values = np.array([image_miou(cm) for cm in cms], dtype=np.float64)
    return _nanmean(values), values


class PerImageScores:
    """The official per-image metrics of a split, fed one image at a time.

    ``add(cm)`` takes one image's ``[C, C+1]`` confusion matrix and returns its ``image_miou``.
    Only ``[C]`` running sums and the per-image values are kept, not the matrices (a COCO-Object
    matrix is 81 x 82).

    Attributes:
        values: the images' ``image_miou`` values, in the order added.
        images_with_class: ``[C]`` int64, images whose ground truth contains the class.
    """

    def __init__(self, num_classes: int) -> None:
        self.values: list[float] = []
        self.images_with_class = np.zeros(int(num_classes), dtype=np.int64)
        self._iou_sums = np.zeros(int(num_classes))

    def add(self, cm: np.ndarray) -> float:
        """Count one image; returns its ``image_miou``."""
        cm = np.asarray(cm)
        if cm.shape[0] != self._iou_sums.shape[0]:
            raise ValueError(f"confusion matrix has {cm.shape[0]} classes, expected {self._iou_sums.shape[0]}")
        present = cm.sum(axis=1) > 0
        self._iou_sums += np.where(present, np.nan_to_num(iou_per_class(cm)), 0.0)
        self.images_with_class += present
        value = image_miou(cm)
        self.values.append(value)
        return value

    @property
    def miou(self) -> float:
        """Per-image mIoU: nanmean of ``values`` (images with no scored pixel are skipped)."""
        return _nanmean(np.array(self.values, dtype=np.float64))

    @property
    def iou_per_class(self) -> np.ndarray:
        """Per class: mean of the per-image IoU_c over the images whose GT contains c; ``[C]``
        float64, NaN for a class in no image's ground truth."""
        counts = self.images_with_class
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, self._iou_sums / np.maximum(counts, 1), np.nan)


def pixel_accuracy(cm: np.ndarray) -> float:
    """Correct scored pixels / scored pixels (void predictions count as wrong); NaN if none."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm[:, :cm.shape[0]]) / total) if total > 0 else float("nan")
