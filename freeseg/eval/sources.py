"""Where the evaluator's label maps come from: ``PredictionSource`` and its two kinds.

* ``PredictionFolder`` (``--predictions DIR``): label maps saved by any method,
  ``DIR/<stem>.png`` per image, same stem as the image, class indices (mode L or P; 255 = no
  class) or the VOC colour palette (RGB), detected per file.
* ``SegmenterSource``: a ``Segmenter`` run here, a callable
  ``segmenter(image [H,W,3] float32 0..1, vocabulary) -> (masks [K,H,W], labels)`` (the
  diffusers backend ``freeseg.backends.diffusers.FreeSegPipeline``, ComfyUI servers through
  ``freeseg.app.comfy_segmenter.ComfySegmenter``, or any Python callable). Its masks and
  names become a label map with ``freeseg.eval.labels.labels_to_prediction``. Modes:

  - ``"closed"``: the segmenter gets ``vocabulary=None`` and names masks itself (e.g. from
    caption nouns); names are mapped to dataset classes by ``freeseg.eval.labels.map_label``.
  - ``"open"``: the segmenter gets the dataset's class names (without background, in
    readable form: "dining table", "potted plant", "tv monitor") as its vocabulary.
  - ``"paper"``: the segmenter gets the dataset's class names as the class list (without
    background, bare, as the official code: "diningtable") and runs the paper protocol.

Each source also says what goes into the evaluator's cache hash (``settings``) and when a
sample's cached scores are stale (``signature``). No torch or ComfyUI import.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from .datasets import DatasetError, Sample, SegDataset, file_signature, read_label_png
from .labels import Synonyms, class_key, labels_to_prediction, synonym_table

__all__ = ["MODES", "PredictionFolder", "PredictionSource", "Segmenter", "SegmenterSource"]

MODES = ("closed", "open", "paper")


@runtime_checkable
class Segmenter(Protocol):
    """A segmentation model as the evaluator calls it.

    ``segmenter(image, vocabulary)``:
        image: ``[H,W,3]`` float32 RGB in 0..1.
        vocabulary: None (closed mode: the model names masks itself, e.g. from caption
            nouns) or the dataset class names to choose from (open mode).
    Returns ``(masks, labels)``: masks ``[K,H,W]`` (numpy or torch, bool or float 0..1) at
    the image's size, labels K names (None = unnamed/background).

    An optional attribute ``cache_key: str`` identifies the model and its settings in the
    resume cache (default: the class name, so give one when settings change).
    """

    def __call__(self, image: np.ndarray,
                 vocabulary: Optional[Sequence[str]] = None) -> tuple[Any, Sequence[Optional[str]]]:
        ...


class PredictionSource:
    """Where label maps come from. Subclasses: PredictionFolder, SegmenterSource."""

    def settings(self) -> dict[str, Any]:
        """JSON-able description that goes into the cache hash."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for reports."""
        raise NotImplementedError

    def check(self, dataset: SegDataset, samples: Sequence[Sample]) -> None:
        """Raise FileNotFoundError before scoring if something needed is missing."""

    def signature(self, sample: Sample) -> str:
        """Changes when this sample's prediction input changes (cache validation)."""
        return ""

    def predict(self, dataset: SegDataset, sample: Sample) -> np.ndarray:
        """Label map ``[H,W]`` int64 of ``sample`` (class indices, 255 = no class)."""
        raise NotImplementedError


class PredictionFolder(PredictionSource):
    """Label maps saved by any method: ``folder/<stem>.png`` (indices or VOC palette)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    def settings(self) -> dict[str, Any]:
        return {"kind": "folder", "path": str(self.folder.resolve())}

    def describe(self) -> str:
        return f"label maps in {self.folder}"

    def path(self, sample: Sample) -> Path:
        return self.folder / f"{sample.stem}.png"

    def check(self, dataset: SegDataset, samples: Sequence[Sample]) -> None:
        if not self.folder.is_dir():
            raise FileNotFoundError(f"predictions folder not found: {self.folder}")
        missing = [str(self.path(s)) for s in samples if not self.path(s).is_file()]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{len(missing)} prediction file(s) missing: "
                                    + ", ".join(missing[:5]) + more)

    def signature(self, sample: Sample) -> str:
        return file_signature(self.path(sample))

    def predict(self, dataset: SegDataset, sample: Sample) -> np.ndarray:
        return read_label_png(self.path(sample), dataset.num_classes)


class SegmenterSource(PredictionSource):
    """Run a ``Segmenter`` per image and turn its named masks into a label map.

    Args:
        segmenter: the model (see ``Segmenter``).
        mode: "closed" (model names masks itself; names mapped with
            ``freeseg.eval.labels.map_label``),
            "open" (model gets the dataset class names as vocabulary) or "paper" (model gets
            the bare class names as the full class list of the paper protocol).
        synonyms: see ``freeseg.eval.labels.map_label``.
        threshold: mask threshold for ``freeseg.eval.labels.labels_to_prediction``.
        name: identifies model + settings in the cache hash (default: ``segmenter.cache_key``
            or the segmenter's class name).
    """

    def __init__(self, segmenter: Segmenter, mode: str = "closed",
                 synonyms: Optional[Synonyms] = None,
                 threshold: float = 0.5, name: Optional[str] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not callable(segmenter):
            raise TypeError("segmenter must be callable: segmenter(image, vocabulary)")
        self.segmenter = segmenter
        self.mode = mode
        self.synonyms = synonyms
        self.threshold = float(threshold)
        self.name = name or getattr(segmenter, "cache_key", None) or type(segmenter).__qualname__

    def settings(self) -> dict[str, Any]:
        table = sorted((k, list(v)) for k, v in synonym_table(self.synonyms).items())
        syn_hash = hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16]
        return {"kind": "segmenter", "name": str(self.name), "mode": self.mode,
                "threshold": self.threshold, "synonyms": syn_hash}

    def describe(self) -> str:
        return f"segmenter {self.name} ({self.mode}-vocabulary mode)"

    def vocabulary(self, dataset: SegDataset) -> Optional[list[str]]:
        """None in closed mode; the dataset's readable class names minus background in open;
        its bare class names minus background in paper."""
        if self.mode == "closed":
            return None
        if self.mode == "paper":
            return [n for n in dataset.class_names if class_key(n) != "background"]
        return [v for v, n in zip(dataset.vocabulary, dataset.class_names) if class_key(n) != "background"]

    def predict(self, dataset: SegDataset, sample: Sample) -> np.ndarray:
        image = dataset.load_image(sample).astype(np.float32) / 255.0
        masks, labels = self.segmenter(image, self.vocabulary(dataset))
        pred = labels_to_prediction(masks, list(labels), dataset.class_names, self.synonyms,
                                    threshold=self.threshold)
        if pred.shape != image.shape[:2]:
            raise DatasetError(f"{sample.stem}: segmenter masks are {pred.shape}, image is "
                               f"{image.shape[:2]}")
        return pred
