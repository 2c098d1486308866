"""Score semantic segmentations on Pascal VOC 2012 / COCO-Object: ``python -m freeseg eval``.

Two metrics are reported side by side (definitions in ``freeseg.eval.metrics``):

* ``miou``: the standard dataset-level mIoU: one confusion matrix over the whole split,
  ground-truth 255 ignored, IoU_c = TP / (TP + FP + FN), mean over the classes that occur in
  the ground truth or in the predictions of the split;
* ``miou_per_image``: the official FreeSeg-Diff code's variant: per image, the mean IoU over
  the classes present in that image's ground truth; then the mean over images.

The official code scored VOC boundary pixels (255) as background; ``--official-boundary``
(``official_boundary=True``) does the same (255 -> 0 in ground truth and predictions).
The default ignores them.

Protocols (``--protocol`` / ``protocol=``):

* ``standard`` (default): both metrics with the boundary handling above, predictions as the
  mode says;
* ``paper``: the paper's numbers as its official code computed them. The segmenter runs the
  whole closed-vocabulary pipeline (``--backend diffusers`` with ``freeseg.stages.PAPER``:
  caption -> words -> candidate classes with the SD text encoder -> CLIP over the full class
  list -> the rule -> CRF -> label map; mode ``"paper"``: the segmenter gets the dataset's
  bare class names without background as the class list), and ``miou_per_image`` is the
  official per-image mIoU with boundaries (255) scored as background, printed beside the
  standard dataset-level ``miou`` (255 ignored).

Predictions come from either

* a folder of label maps (``--predictions DIR`` / ``PredictionFolder``): ``DIR/<stem>.png``
  per image, same stem as the image, class indices (mode L or P; 255 = no class) or the VOC
  colour palette (RGB), detected per file; or
* a ``Segmenter`` run here (Python API only for now; ``SegmenterSource``): a callable
  ``segmenter(image [H,W,3] float32 0..1, vocabulary) -> (masks [K,H,W], labels)``. Its masks
  and names become a label map with ``labels_to_prediction``. Two modes:

  - ``"closed"``: the segmenter gets ``vocabulary=None`` and names masks itself (e.g. from
    caption nouns). Names are mapped to dataset classes by ``map_label``: exact name,
    then the synonym table ``DEFAULT_SYNONYMS`` ("man" -> person, "plane" -> aeroplane /
    airplane, "tv" -> tvmonitor / tv, ...), then the singular form, then the head word
    ("small bird" -> bird). Unmapped names and unnamed masks become background. (The
    official code instead matched words to classes by text-embedding similarity.)
  - ``"open"``: the segmenter gets the dataset's class names (without background, in
    readable form: "dining table", "potted plant", "tv monitor") as its vocabulary.
  - ``"paper"``: the segmenter gets the dataset's class names as the class list (without
    background, bare, as the official code: "diningtable") and runs the paper protocol.

With ``--out DIR`` (``out_dir``) the run is resumable: each image's confusion matrix is
cached as ``DIR/cache/<settings-hash>/<stem>.npz`` (the hash covers dataset, root, split,
classes, boundary handling and the prediction source; a changed prediction or ground-truth
file is noticed by size and mtime), and a rerun only scores the images not yet done. The same
folder receives ``results.md``, ``results.csv``, ``results.json``, ``per_class_iou.png``
(bar chart; needs matplotlib) and ``examples.png`` (image | ground truth | prediction for the
first N images). A Segmenter run also saves its label maps as palette PNGs in
``DIR/predictions/<settings-hash>/`` (re-scorable with ``--predictions``).

Command line::

    python -m freeseg eval --dataset voc --root VOCdevkit/VOC2012 --predictions PRED_DIR
    python -m freeseg eval --dataset coco-object --root COCO_OBJECT --predictions PRED_DIR \\
        --json --limit 500 --out results/coco --official-boundary
    python -m freeseg eval --dataset voc --root VOCdevkit/VOC2012 --backend comfyui \\
        --url http://gpu0:8188 --url http://gpu1:8188 --mode closed --out results/voc
    python -m freeseg eval --dataset voc --root VOCdevkit/VOC2012 --protocol paper \\
        --backend diffusers --sd sd-v1-4.safetensors --blip2 models/blip --clip models/clip

``--backend comfyui`` runs an API workflow (default ``workflows/api/freeseg_full.json``; any
checkpoint family the nodes support) on ComfyUI servers through
``freeseg.app.comfy_segmenter.ComfySegmenter``, several images at once (``workers``).

No ComfyUI import; scoring needs no torch either (torch masks are accepted duck-typed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence, Union, \
    runtime_checkable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .datasets import (
    DATASETS, IGNORE_INDEX, DatasetError, Sample, SegDataset, colorize, file_signature,
    load_dataset, read_class_names, read_label_png, save_label_png,
)
from ..nouns import singular
from .metrics import confusion_matrix, image_miou as _image_miou, iou_per_class, pixel_accuracy

__all__ = [
    "DEFAULT_SYNONYMS", "EvalResult", "MODES", "PredictionFolder", "PredictionSource",
    "PROTOCOLS", "Segmenter", "SegmenterSource", "evaluate", "format_table", "labels_to_prediction",
    "main", "map_label", "write_reports",
]

CACHE_FORMAT = 2  # 2: both confusion matrices (255 ignored / 255 as background) per image
MODES = ("closed", "open", "paper")
PROTOCOLS = ("standard", "paper")

# ------------------------------------------------------------------------------------
# Names -> dataset classes
# ------------------------------------------------------------------------------------

DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
    # people
    **{w: ("person",) for w in (
        "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "people", "lady",
        "guy", "gentleman", "player", "human", "adult", "teenager", "skier", "surfer",
        "skateboarder", "snowboarder", "rider", "pedestrian", "crowd", "athlete", "worker")},
    # vehicles
    **{w: ("aeroplane", "airplane") for w in (
        "plane", "airplane", "aeroplane", "aircraft", "jet", "airliner", "jetliner")},
    **{w: ("bicycle",) for w in ("bike", "bicycle", "cycle")},
    **{w: ("motorbike", "motorcycle") for w in ("motorbike", "motorcycle", "scooter", "moped")},
    **{w: ("boat",) for w in ("ship", "yacht", "sailboat", "canoe", "kayak", "ferry")},
    **{w: ("car",) for w in ("taxi", "cab", "jeep", "suv", "automobile")},
    **{w: ("train",) for w in ("locomotive", "tram", "railway", "subway")},
    **{w: ("truck",) for w in ("lorry", "pickup")},
    # furniture / indoor
    **{w: ("tvmonitor", "tv") for w in (
        "tv", "television", "monitor", "screen", "tv monitor", "computer monitor")},
    **{w: ("sofa", "couch") for w in ("sofa", "couch")},
    **{w: ("pottedplant", "potted plant") for w in (
        "plant", "potted plant", "houseplant", "house plant", "flowerpot", "flower pot")},
    **{w: ("diningtable", "dining table") for w in (
        "table", "dining table", "dinner table", "kitchen table")},
    **{w: ("chair",) for w in ("armchair", "stool")},
    **{w: ("cell phone",) for w in ("phone", "cellphone", "mobile phone", "smartphone")},
    "fridge": ("refrigerator",), "hair dryer": ("hair drier",), "hairdryer": ("hair drier",),
    "doughnut": ("donut",), "hotdog": ("hot dog",), "hot dog": ("hot dog",),
    "teddy": ("teddy bear",), "ball": ("sports ball",), "racket": ("tennis racket",),
    "racquet": ("tennis racket",), "hydrant": ("fire hydrant",), "mug": ("cup",),
    "purse": ("handbag",), "bag": ("handbag",), "rucksack": ("backpack",),
    "remote control": ("remote",), "ski": ("skis",),
    # animals
    **{w: ("dog",) for w in ("puppy", "pup")},
    **{w: ("cat",) for w in ("kitten", "kitty")},
    **{w: ("cow",) for w in ("cattle", "calf", "bull", "ox", "oxen")},
    **{w: ("sheep",) for w in ("lamb", "ram")},
    **{w: ("horse",) for w in ("pony", "foal")},
    **{w: ("bird",) for w in (
        "parrot", "duck", "seagull", "gull", "pigeon", "eagle", "owl", "chicken", "hen",
        "goose", "swan", "sparrow")},
}
"""Name (any case / spacing) -> candidate dataset class names, first present one wins.

A name listed here is final: if none of its targets is a class of the dataset it maps to
nothing (so "hot dog" never falls back to its head word "dog")."""


def _key(text: str) -> str:
    """Comparison key: lowercase letters and digits only ("Dining-Table" -> "diningtable")."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _synonym_table(synonyms: Optional[Mapping[str, Union[str, Sequence[str]]]]) -> dict[str, tuple[str, ...]]:
    table = DEFAULT_SYNONYMS if synonyms is None else synonyms
    out: dict[str, tuple[str, ...]] = {}
    for name, targets in table.items():
        out[_key(name)] = (targets,) if isinstance(targets, str) else tuple(targets)
    return out


def map_label(label: Optional[str], class_names: Sequence[str],
              synonyms: Optional[Mapping[str, Union[str, Sequence[str]]]] = None) -> Optional[int]:
    """Dataset class index of a mask name, or None (-> background).

    Tries, for the whole name and then for ever shorter tails of it ("a small black dog" ->
    "small black dog" -> "black dog" -> "dog"), each as written and with its last word made
    singular: (1) a class name, compared on letters and digits only ("dining table" ==
    "diningtable"); (2) the synonym table (``DEFAULT_SYNONYMS`` when ``synonyms`` is None;
    pass ``{}`` for none), whose entries are final. First hit wins.

    Args:
        label: a mask name, or None.
        class_names: the dataset's C class names (index = class id).
        synonyms: name -> target class name(s).
    """
    if label is None:
        return None
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        index.setdefault(_key(name), i)
    table = _synonym_table(synonyms)
    words = re.findall(r"[a-z0-9]+", label.lower())
    for start in range(len(words)):
        tail = words[start:]
        variants = [tail]
        single = singular(tail[-1])
        if single != tail[-1]:
            variants.append(tail[:-1] + [single])
        for variant in variants:
            key = "".join(variant)
            if key in index:
                return index[key]
            if key in table:
                for target in table[key]:
                    if _key(target) in index:
                        return index[_key(target)]
                return None
    return None


def _as_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array / torch tensor (duck-typed, no torch import) / nested list."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array)


def labels_to_prediction(masks: Any, labels: Sequence[Optional[str]], class_names: Sequence[str],
                         synonyms: Optional[Mapping[str, Union[str, Sequence[str]]]] = None, *,
                         background: int = 0, threshold: float = 0.5) -> np.ndarray:
    """Paint named masks into one class-index map.

    Each pixel takes the class of the mask with the highest value there (ties -> the lowest
    mask index) if that value is >= ``threshold``; otherwise, and for masks whose name is
    None or maps to no class (``map_label``), it is ``background``.

    Args:
        masks: ``[K,H,W]`` bool or float in 0..1 (numpy array or torch tensor).
        labels: K names (or None).
        class_names: the dataset's C class names.
        synonyms: see ``map_label``.
        background: class index of unnamed pixels.
        threshold: a mask covers a pixel where its value is >= threshold.

    Returns:
        ``[H,W]`` int64 class indices.
    """
    m = _as_numpy(masks).astype(np.float32)
    if m.ndim != 3:
        raise ValueError(f"masks must be [K,H,W], got shape {m.shape}")
    if len(labels) != m.shape[0]:
        raise ValueError(f"{m.shape[0]} masks but {len(labels)} labels")
    out = np.full(m.shape[1:], background, dtype=np.int64)
    if m.shape[0] == 0:
        return out
    mapped = [map_label(lab, class_names, synonyms) for lab in labels]
    ids = np.array([background if c is None else c for c in mapped], dtype=np.int64)
    m = np.nan_to_num(m, nan=-np.inf)
    best = m.argmax(axis=0)
    covered = np.take_along_axis(m, best[None], axis=0)[0] >= threshold
    out[covered] = ids[best[covered]]
    return out


# ------------------------------------------------------------------------------------
# Prediction sources
# ------------------------------------------------------------------------------------

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
        mode: "closed" (model names masks itself; names mapped with ``map_label``),
            "open" (model gets the dataset class names as vocabulary) or "paper" (model gets
            the bare class names as the full class list of the paper protocol).
        synonyms: see ``map_label``.
        threshold: mask threshold for ``labels_to_prediction``.
        name: identifies model + settings in the cache hash (default: ``segmenter.cache_key``
            or the segmenter's class name).
    """

    def __init__(self, segmenter: Segmenter, mode: str = "closed",
                 synonyms: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
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
        table = sorted((k, list(v)) for k, v in _synonym_table(self.synonyms).items())
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
            return [n for n in dataset.class_names if _key(n) != "background"]
        return [v for v, n in zip(dataset.vocabulary, dataset.class_names) if _key(n) != "background"]

    def predict(self, dataset: SegDataset, sample: Sample) -> np.ndarray:
        image = dataset.load_image(sample).astype(np.float32) / 255.0
        masks, labels = self.segmenter(image, self.vocabulary(dataset))
        pred = labels_to_prediction(masks, list(labels), dataset.class_names, self.synonyms,
                                    threshold=self.threshold)
        if pred.shape != image.shape[:2]:
            raise DatasetError(f"{sample.stem}: segmenter masks are {pred.shape}, image is "
                               f"{image.shape[:2]}")
        return pred


# ------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------

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
            "miou": _num(self.miou),
            "miou_per_image": _num(self.miou_per_image),
            "per_class_iou": {n: _num(v) for n, v in zip(self.class_names, self.iou)},
        }


def _num(value: float) -> Optional[float]:
    """float, or None for NaN (JSON null)."""
    value = float(value)
    return None if math.isnan(value) else value


def _settings(dataset: SegDataset, source: PredictionSource) -> dict[str, Any]:
    """What the cached matrices depend on (both boundary variants are cached, so neither the
    boundary handling nor the protocol is part of it)."""
    return {
        "format": CACHE_FORMAT, "dataset": dataset.name, "root": str(Path(dataset.root).resolve()),
        "split": dataset.split, "class_names": list(dataset.class_names), "source": source.settings(),
    }


def settings_hash(settings: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the settings' canonical JSON."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _safe_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)


def _load_cached(path: Path, signature: str, shape: tuple[int, int]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The cached ``[C, C+1]`` matrices (255 ignored, 255 as background) if the file is
    readable and still valid, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            cm = data["cm"].astype(np.int64)
            cm_bg = data["cm_bg"].astype(np.int64)
            sig = str(data["sig"])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    return (cm, cm_bg) if cm.shape == cm_bg.shape == shape and sig == signature else None


def _save_cached(path: Path, cms: tuple[np.ndarray, np.ndarray], signature: str) -> None:
    """Write atomically (temp file + rename) so an interrupted run leaves no broken entry."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, cm=cms[0], cm_bg=cms[1], sig=np.array(signature))
    os.replace(tmp, path)


def _score_sample(dataset: SegDataset, source: PredictionSource, sample: Sample,
                  save_to: Optional[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrices ``[C, C+1]`` of one image (reads GT, gets the prediction): with
    label 255 ignored, and with 255 scored as background (official code)."""
    gt = dataset.load_label(sample)
    pred = source.predict(dataset, sample)
    if save_to is not None:
        save_label_png(save_to, pred)
    if gt.shape != pred.shape:
        raise DatasetError(f"{sample.stem}: prediction is {pred.shape[0]}x{pred.shape[1]} but the "
                           f"ground truth {sample.label_path} is {gt.shape[0]}x{gt.shape[1]}")
    cm = confusion_matrix(gt, pred, dataset.num_classes, IGNORE_INDEX)
    gt_bg = np.where(gt == IGNORE_INDEX, 0, gt)
    pred_bg = np.where(pred == IGNORE_INDEX, 0, pred)
    return cm, confusion_matrix(gt_bg, pred_bg, dataset.num_classes, IGNORE_INDEX)


def _progress(items: Iterable[Any], enabled: Optional[bool], total: int) -> Iterable[Any]:
    """tqdm bar on stderr (None: only on a terminal); plain iteration without tqdm."""
    if enabled is False:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc="eval", unit="img", file=sys.stderr,
                disable=None if enabled is None else False)


def _ordered_map(fn: Callable[[Sample], Any], items: Sequence[Sample], workers: int) -> Iterator[Any]:
    """``fn`` over `items`, results in order; with `workers` > 1 that many threads, at most
    2 x workers items ahead of the consumer (so an interruption loses little)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="freeseg-eval") as pool:
        ahead: deque = deque()
        try:
            for item in items:
                ahead.append(pool.submit(fn, item))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()


def evaluate(dataset: SegDataset, source: Union[PredictionSource, Segmenter], *,
             official_boundary: bool = False, limit: Optional[int] = None,
             out_dir: Optional[Path | str] = None, examples: int = 4,
             progress: Optional[bool] = None, use_cache: bool = True, mode: str = "closed",
             synonyms: Optional[Mapping[str, Union[str, Sequence[str]]]] = None,
             workers: int = 1, protocol: str = "standard") -> EvalResult:
    """Score a prediction source on a dataset split.

    Args:
        dataset: from ``freeseg.eval.datasets.load_dataset``.
        source: a PredictionSource, or a Segmenter (wrapped in ``SegmenterSource(source,
            mode, synonyms)``).
        official_boundary: score GT/prediction 255 as background (official code) instead of
            ignoring it.
        limit: score only the first N images of the split.
        out_dir: cache + reports folder (None: no cache, no files).
        examples: images in ``examples.png`` (0: none).
        progress: progress bar (None: only when stderr is a terminal).
        use_cache: False recomputes every image (the cache is still rewritten).
        workers: images predicted at once, in threads (a thread-safe source only, e.g.
            ``freeseg.app.comfy_segmenter.ComfySegmenter`` over several servers); results are
            accumulated in split order, so the scores do not depend on it.
        protocol: "standard" or "paper" (module docstring; ``official_boundary`` is then
            not used: the dataset-level metric ignores 255, the per-image one scores it as
            background).

    Returns:
        EvalResult (with ``files`` naming the reports written).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not isinstance(source, PredictionSource):
        source = SegmenterSource(source, mode=mode, synonyms=synonyms)
    samples = list(dataset.samples)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        samples = samples[:limit]
    source.check(dataset, samples)
    settings = _settings(dataset, source)
    digest = settings_hash(settings)
    cache_dir = pred_dir = None
    if out_dir is not None:
        cache_dir = Path(out_dir) / "cache" / digest
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True),
                                                 encoding="utf-8")
        if isinstance(source, SegmenterSource):
            pred_dir = Path(out_dir) / "predictions" / digest
            pred_dir.mkdir(parents=True, exist_ok=True)

    c = dataset.num_classes
    total = np.zeros((c, c + 1), dtype=np.int64)
    sums = np.zeros(c)
    counts = np.zeros(c, dtype=np.int64)
    image_miou: dict[str, float] = {}
    n_scored = n_cached = 0

    def confusion(sample: Sample) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
        """((confusion matrix, the same with label 255 as background), whether it came from the
        cache) of one image."""
        entry = cache_dir / f"{_safe_stem(sample.stem)}.npz" if cache_dir is not None else None
        signature = ""
        if entry is not None:
            signature = source.signature(sample) + "|" + file_signature(sample.label_path)
            if use_cache and entry.is_file():
                cached = _load_cached(entry, signature, (c, c + 1))
                if cached is not None:
                    return cached, True
        save_to = pred_dir / f"{_safe_stem(sample.stem)}.png" if pred_dir is not None else None
        cms = _score_sample(dataset, source, sample, save_to)
        if entry is not None:
            _save_cached(entry, cms, signature)
        return cms, False

    scored = _ordered_map(confusion, samples, max(1, int(workers)))
    for sample, (cms, from_cache) in zip(samples, _progress(scored, progress, len(samples))):
        n_cached += from_cache
        n_scored += not from_cache
        if protocol == "paper":
            total += cms[0]
            cm = cms[1]
        else:
            cm = cms[1] if official_boundary else cms[0]
            total += cm
        present = cm.sum(axis=1) > 0
        iou = iou_per_class(cm)
        sums += np.where(present, np.nan_to_num(iou), 0.0)
        counts += present
        image_miou[sample.stem] = _image_miou(cm)

    iou = iou_per_class(total)
    defined = iou[~np.isnan(iou)]
    per_image = np.array(list(image_miou.values()), dtype=np.float64)
    per_image = per_image[~np.isnan(per_image)]
    with np.errstate(invalid="ignore", divide="ignore"):
        iou_img = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    result = EvalResult(
        dataset=dataset.name, split=dataset.split, class_names=tuple(dataset.class_names),
        miou=float(defined.mean()) if defined.size else float("nan"),
        miou_per_image=float(per_image.mean()) if per_image.size else float("nan"),
        iou=iou, iou_per_image=iou_img, images_with_class=counts,
        pixel_accuracy=pixel_accuracy(total), confusion=total, image_miou=image_miou,
        official_boundary=bool(official_boundary), source=source.describe(),
        settings_hash=digest, n_scored=n_scored, n_cached=n_cached, protocol=protocol)
    if out_dir is not None:
        result.files = write_reports(result, dataset, source, samples, Path(out_dir), examples,
                                     pred_dir)
    return result


# ------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------

DATASET_TITLES = {"voc": "Pascal VOC 2012", "coco-object": "COCO-Object"}


def _pct(value: float) -> str:
    return "-" if math.isnan(float(value)) else f"{100.0 * float(value):.2f}"


def _boundary_text(result: EvalResult) -> str:
    if result.protocol == "paper":
        return ("paper protocol: label 255 ignored in the dataset-level mIoU, scored as background in "
                "the per-image one (official code)")
    return ("label 255 scored as background (--official-boundary)" if result.official_boundary
            else "label 255 ignored")


def format_table(result: EvalResult) -> str:
    """Human-readable summary + per-class table (IoU in percent)."""
    title = DATASET_TITLES.get(result.dataset, result.dataset)
    gt_px = result.confusion.sum(axis=1)
    pred_px = result.confusion[:, :len(result.class_names)].sum(axis=0)
    width = max(12, max(len(n) for n in result.class_names))
    lines = [
        f"{title} ({result.split}): {result.n_images} images, {_boundary_text(result)}",
        f"predictions: {result.source}",
        f"  mIoU, dataset-level (standard)     : {_pct(result.miou)}",
        f"  mIoU, per-image mean (official)    : {_pct(result.miou_per_image)}",
        f"  pixel accuracy                     : {_pct(result.pixel_accuracy)}",
        "",
        f"{'class':<{width}}  {'IoU':>7}  {'IoU/img':>7}  {'images':>6}  {'GT px':>10}  {'pred px':>10}",
    ]
    for i, name in enumerate(result.class_names):
        lines.append(f"{name:<{width}}  {_pct(result.iou[i]):>7}  {_pct(result.iou_per_image[i]):>7}"
                     f"  {int(result.images_with_class[i]):>6}  {int(gt_px[i]):>10}  {int(pred_px[i]):>10}")
    return "\n".join(lines)


def _csv_value(value: float) -> str:
    return "" if math.isnan(float(value)) else f"{float(value):.6f}"


def write_reports(result: EvalResult, dataset: SegDataset, source: PredictionSource,
                  samples: Sequence[Sample], out_dir: Path, examples: int = 4,
                  pred_dir: Optional[Path] = None) -> dict[str, Path]:
    """Write results.{md,csv,json}, per_class_iou.png and examples.png; return their paths.

    ``results.csv`` columns: class, index, iou, iou_per_image, images_with_class, gt_pixels,
    pred_pixels (counts over scored pixels, i.e. GT not ignored); one row per class (values
    0..1, empty = undefined), then a row ``mIoU`` holding the two mIoUs in the iou /
    iou_per_image columns.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    c = len(result.class_names)
    gt_px = result.confusion.sum(axis=1)
    pred_px = result.confusion[:, :c].sum(axis=0)

    csv_path = out_dir / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "index", "iou", "iou_per_image", "images_with_class",
                         "gt_pixels", "pred_pixels"])
        for i, name in enumerate(result.class_names):
            writer.writerow([name, i, _csv_value(result.iou[i]), _csv_value(result.iou_per_image[i]),
                             int(result.images_with_class[i]), int(gt_px[i]), int(pred_px[i])])
        writer.writerow(["mIoU", "", _csv_value(result.miou), _csv_value(result.miou_per_image),
                         result.n_images, int(gt_px.sum()), int(pred_px.sum())])
    files["csv"] = csv_path

    title = DATASET_TITLES.get(result.dataset, result.dataset)
    md = [
        f"# {title} ({result.split}): segmentation scores", "",
        "| setting | value |", "| --- | --- |",
        f"| dataset root | `{dataset.root}` |",
        f"| images scored | {result.n_images} |",
        f"| predictions | {result.source} |",
        f"| boundary | {_boundary_text(result)} |",
        f"| settings hash | `{result.settings_hash}` |", "",
        "| metric | value (%) |", "| --- | ---: |",
        f"| mIoU, dataset-level (standard) | {_pct(result.miou)} |",
        f"| mIoU, per-image mean (official FreeSeg-Diff code) | {_pct(result.miou_per_image)} |",
        f"| pixel accuracy | {_pct(result.pixel_accuracy)} |", "",
        "Dataset-level: one confusion matrix over the split, IoU = TP/(TP+FP+FN) per class, "
        "mean over classes present in the ground truth or the predictions. Per-image: each "
        "image's mean IoU over the classes in its ground truth, averaged over images. "
        "IoU per image (column): mean of a class's IoU over the images containing it.", "",
        "| class | IoU | IoU per image | images | GT pixels | predicted pixels |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, name in enumerate(result.class_names):
        md.append(f"| {name} | {_pct(result.iou[i])} | {_pct(result.iou_per_image[i])} | "
                  f"{int(result.images_with_class[i])} | {int(gt_px[i])} | {int(pred_px[i])} |")
    md_path = out_dir / "results.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    files["markdown"] = md_path

    json_path = out_dir / "results.json"
    payload = dict(result.to_json())
    payload["details"] = {
        "dataset": result.dataset, "split": result.split, "n_images": result.n_images,
        "official_boundary": result.official_boundary, "protocol": result.protocol, "source": result.source,
        "settings_hash": result.settings_hash, "pixel_accuracy": _num(result.pixel_accuracy),
        "per_class_iou_per_image": {n: _num(v) for n, v in zip(result.class_names, result.iou_per_image)},
        "image_miou": {k: _num(v) for k, v in result.image_miou.items()},
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    files["json"] = json_path

    chart = _bar_chart(result, out_dir / "per_class_iou.png")
    if chart is not None:
        files["chart"] = chart
    if examples > 0 and samples:
        files["examples"] = _examples_grid(result, dataset, source, samples[:examples],
                                           out_dir / "examples.png", pred_dir)
    return files


def _bar_chart(result: EvalResult, path: Path) -> Optional[Path]:
    """Horizontal grouped bars of per-class IoU (dataset-level and per-image), PNG via the
    Agg canvas (no global backend change). None, with a warning, without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("freeseg eval: matplotlib is not installed; per-class chart skipped", file=sys.stderr)
        return None
    names = list(result.class_names)
    n = len(names)
    y = np.arange(n)
    fig = Figure(figsize=(7.0, 1.2 + 0.28 * n), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(y - 0.2, np.nan_to_num(result.iou) * 100, height=0.4, label="dataset-level IoU")
    ax.barh(y + 0.2, np.nan_to_num(result.iou_per_image) * 100, height=0.4, label="per-image IoU")
    for i in np.flatnonzero(np.isnan(result.iou)):
        ax.text(1, y[i], "n/a", va="center", fontsize=7, color="0.5")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"{DATASET_TITLES.get(result.dataset, result.dataset)} {result.split}: "
                 f"mIoU {_pct(result.miou)} / per-image {_pct(result.miou_per_image)}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _examples_grid(result: EvalResult, dataset: SegDataset, source: PredictionSource,
                   samples: Sequence[Sample], path: Path, pred_dir: Optional[Path],
                   panel_h: int = 160) -> Path:
    """PNG grid, one row per sample: image | ground truth | prediction (VOC colours)."""
    font = ImageFont.load_default()
    rows: list[Image.Image] = []
    text_h, pad = 14, 4

    def prediction(sample: Sample) -> np.ndarray:
        saved = pred_dir / f"{_safe_stem(sample.stem)}.png" if pred_dir is not None else None
        if saved is not None and saved.is_file():
            return read_label_png(saved)
        return source.predict(dataset, sample)

    for sample in samples:
        image = dataset.load_image(sample)
        h, w = image.shape[:2]
        pw = max(1, round(w * panel_h / h))
        panels = [Image.fromarray(image).resize((pw, panel_h), Image.BILINEAR),
                  Image.fromarray(colorize(dataset.load_label(sample))).resize((pw, panel_h), Image.NEAREST),
                  Image.fromarray(colorize(prediction(sample))).resize((pw, panel_h), Image.NEAREST)]
        row = Image.new("RGB", (3 * pw + 4 * pad, panel_h + text_h + pad), "white")
        draw = ImageDraw.Draw(row)
        score = result.image_miou.get(sample.stem, float("nan"))
        draw.text((pad, 1), f"{sample.stem}  mIoU {_pct(score)}", fill="black", font=font)
        for j, panel in enumerate(panels):
            row.paste(panel, (pad + j * (pw + pad), text_h))
        rows.append(row)
    width = max(r.width for r in rows)
    header = 16
    grid = Image.new("RGB", (width, header + sum(r.height for r in rows)), "white")
    draw = ImageDraw.Draw(grid)
    first_pw = (rows[0].width - 4 * pad) // 3
    for j, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((pad + j * (first_pw + pad), 2), title, fill="black", font=font)
    y = header
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    grid.save(path)
    return path


# ------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m freeseg eval",
        description="Score segmentations on Pascal VOC 2012 or COCO-Object: standard "
                    "dataset-level mIoU and the official per-image-averaged mIoU.")
    parser.add_argument("--dataset", choices=DATASETS, default="voc",
                        help="dataset layout (default: voc)")
    parser.add_argument("--root", required=True, type=Path,
                        help="dataset folder (VOC: VOC2012 with JPEGImages/, SegmentationClass/, "
                             "ImageSets/Segmentation/; COCO-Object: images/<split>/, annotations/<split>/)")
    parser.add_argument("--split", default=None,
                        help="split name (default: val for VOC, val2017 for COCO-Object)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", type=Path, metavar="DIR",
                     help="folder of <stem>.png label maps (class indices or VOC palette colours)")
    src.add_argument("--backend", choices=("diffusers", "comfyui"),
                     help="run FreeSeg-Diff itself on every image: diffusers (freeseg.backends.diffusers) or "
                          "comfyui (an API workflow on ComfyUI servers, freeseg.app.comfy_segmenter)")
    model = parser.add_argument_group("model (with --backend diffusers)")
    model.add_argument("--sd", type=Path, metavar="FILE_OR_DIR",
                       help="Stable Diffusion checkpoint (.safetensors, LDM layout) or diffusers folder")
    model.add_argument("--sd-config", type=Path, default=None, metavar="DIR",
                       help="diffusers-layout config folder for a non-standard checkpoint")
    model.add_argument("--vae", type=Path, default=None, metavar="PATH", help="VAE to use instead of the checkpoint's")
    model.add_argument("--blip2", type=Path, default=None, metavar="DIR",
                       help="captioner folder: BLIP (the paper's, Salesforce/blip-image-captioning-base) or BLIP-2")
    model.add_argument("--clip", type=Path, metavar="PATH", help="open_clip model folder or weights file")
    comfy = parser.add_argument_group("model (with --backend comfyui; --blip2 / --clip then name the models on "
                                      "the server, default: its only one)")
    comfy.add_argument("--url", action="append", default=None, metavar="URL",
                       help="a ComfyUI server with this node pack (default http://127.0.0.1:8188); repeat it to "
                            "spread the images over several servers")
    comfy.add_argument("--per-server", type=int, default=2, metavar="N", help="prompts in flight per server (default 2)")
    comfy.add_argument("--workflow", default=None, metavar="FILE",
                       help="API-format workflow (default workflows/api/freeseg_full.json)")
    comfy.add_argument("--checkpoint", default=None, metavar="NAME", help="checkpoint name on the server")
    comfy.add_argument("--clusters", type=int, default=None, metavar="K", help="masks per image (workflow: 4)")
    comfy.add_argument("--seed", type=int, default=None, help="seed of the noise and the k-means start")
    comfy.add_argument("--resolution", type=int, default=None, metavar="PX",
                       help="resolution of the diffusion features pass (workflow: 512)")
    comfy.add_argument("--set", dest="overrides", action="append", default=[], metavar="CLASS.INPUT=VALUE",
                       help="set any input of the workflow's nodes of a class")
    comfy.add_argument("--timeout", type=float, default=3600.0, help="seconds one image may take (default 3600)")
    model.add_argument("--mode", choices=("closed", "open"), default="closed",
                       help="closed: the model names masks from its caption, names mapped to dataset classes; "
                            "open: the dataset's class names are the vocabulary")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                        help="standard: today's metrics and modes; paper: the paper's closed-vocabulary "
                             "pipeline (with --backend diffusers: the PAPER preset, the dataset's full class "
                             "list, candidates from the caption; --mode is not used) and the official "
                             "per-image mIoU with label 255 as background beside the dataset-level mIoU")
    parser.add_argument("--official-boundary", action="store_true",
                        help="score label 255 as background, as the official FreeSeg-Diff code "
                             "did for VOC boundaries (default: ignore 255)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="score only the first N images of the split")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write results.md/.csv/.json, per_class_iou.png, examples.png and a "
                             "resume cache here")
    parser.add_argument("--examples", type=int, default=4, metavar="N",
                        help="images in examples.png (default 4; 0: none)")
    parser.add_argument("--class-names", type=Path, default=None, metavar="FILE",
                        help="class names, one per line (line i = label i); overrides the built-in list")
    parser.add_argument("--json", action="store_true",
                        help='print only {"miou", "miou_per_image", "per_class_iou"} as JSON')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-cache", action="store_true",
                        help="rescore every image even if cached under --out")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry (``python -m freeseg eval ...``). Returns the exit status (0 ok, 2 error)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.backend == "diffusers" and (args.sd is None or args.clip is None):
        parser.error("--backend diffusers needs --sd and --clip (and --blip2 for --mode closed)")
    if args.backend == "comfyui" and (args.sd is not None or args.sd_config is not None or args.vae is not None):
        parser.error("--sd, --sd-config and --vae are for --backend diffusers; with comfyui use --checkpoint "
                     "(a name on the server) or --workflow")
    if args.backend != "comfyui" and args.url:
        parser.error("--url is for --backend comfyui")
    if args.protocol == "paper" and args.backend == "diffusers" and args.blip2 is None:
        parser.error("--protocol paper with --backend diffusers needs --blip2 (the captioner): the candidate "
                     "classes come from the caption")
    if args.protocol == "paper" and args.official_boundary:
        parser.error("--protocol paper already scores label 255 as background in the per-image mIoU; "
                     "drop --official-boundary")
    if args.protocol == "paper" and args.backend == "comfyui":
        parser.error("--protocol paper runs the paper pipeline through --backend diffusers (or scores --predictions)")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    errors: tuple = (FileNotFoundError, DatasetError, ValueError)
    workers = 1
    if args.backend == "comfyui":
        from ..app.comfy_segmenter import EVAL_ERRORS
        errors += EVAL_ERRORS
    try:
        names = read_class_names(args.class_names) if args.class_names is not None else None
        dataset = load_dataset(args.dataset, args.root, args.split, names)
        mode = args.mode
        if args.backend == "comfyui":
            from ..app.comfy_segmenter import segmenter_from_args

            source = segmenter_from_args(args)
            workers = source.workers
        elif args.backend == "diffusers":
            from ..backends.diffusers import DEFAULTS, PAPER, FreeSegPipeline

            paper = args.protocol == "paper"
            source = FreeSegPipeline.from_pretrained(str(args.sd), clip=str(args.clip),
                                                     blip2=str(args.blip2) if args.blip2 else None,
                                                     sd_config=args.sd_config, vae=args.vae,
                                                     settings=PAPER if paper else DEFAULTS)
            mode = "paper" if paper else mode
        else:
            source = PredictionFolder(args.predictions)
        result = evaluate(dataset, source, mode=mode, protocol=args.protocol,
                          official_boundary=args.official_boundary, limit=args.limit,
                          out_dir=args.out, examples=max(0, args.examples),
                          progress=False if args.no_progress else None,
                          use_cache=not args.no_cache, workers=workers)
    except errors as exc:
        print(f"freeseg eval: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_table(result))
    if args.out is not None:
        print(f"freeseg eval: {result.n_scored} image(s) scored, {result.n_cached} from cache; "
              f"reports in {args.out}", file=sys.stderr)
    return 0
