"""Score semantic segmentations on a dataset split: ``evaluate``, with its resume cache.

Two metrics are reported side by side, both computed by ``freeseg.eval.metrics``:

* ``miou``: the standard dataset-level mIoU: one confusion matrix over the whole split,
  ground-truth 255 ignored, IoU_c = TP / (TP + FP + FN), mean over the classes that occur in
  the ground truth or in the predictions of the split;
* ``miou_per_image``: the official FreeSeg-Diff code's variant: per image, the mean IoU over
  the classes present in that image's ground truth; then the mean over images.

The official code scored VOC boundary pixels (255) as background; ``official_boundary=True``
(``--official-boundary``) does the same (255 -> 0 in ground truth and predictions). The
default ignores them.

Protocols (``protocol=`` / ``--protocol``):

* ``standard`` (default): both metrics with the boundary handling above, predictions as the
  source gives them;
* ``paper``: the paper's numbers as its official code computed them. The segmenter runs the
  whole closed-vocabulary pipeline (``--backend diffusers`` with ``freeseg.stages.PAPER``:
  caption -> words -> candidate classes with the SD text encoder -> CLIP over the full class
  list -> the rule -> CRF -> label map; mode ``"paper"`` of
  ``freeseg.eval.sources.SegmenterSource``), and ``miou_per_image`` is the official per-image
  mIoU with boundaries (255) scored as background, printed beside the standard dataset-level
  ``miou`` (255 ignored).

Label maps come from a ``freeseg.eval.sources.PredictionSource`` (a folder of label maps, or
a ``Segmenter`` run here).

With ``out_dir`` (``--out DIR``) the run is resumable: each image's confusion matrices (255
ignored, 255 as background) are cached as ``DIR/cache/<settings-hash>/<stem>.npz`` (the hash
covers dataset, root, split, classes and the prediction source; a changed prediction or
ground-truth file is noticed by size and mtime), and a rerun only scores the images not yet
done. The same folder receives the reports of ``freeseg.eval.reports.write_reports``. A
Segmenter run also saves its label maps as palette PNGs in ``DIR/predictions/<settings-hash>/``
(re-scorable with ``--predictions``).

No ComfyUI import; scoring needs no torch either.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from .datasets import IGNORE_INDEX, DatasetError, Sample, SegDataset, file_signature, save_label_png
from .labels import Synonyms
from .metrics import PerImageScores, confusion_matrix, dataset_miou, pixel_accuracy
from .reports import write_reports
from .result import EvalResult
from .sources import PredictionSource, Segmenter, SegmenterSource

__all__ = ["PROTOCOLS", "evaluate", "settings_hash"]

CACHE_FORMAT = 2  # 2: both confusion matrices (255 ignored / 255 as background) per image
PROTOCOLS = ("standard", "paper")


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
             synonyms: Optional[Synonyms] = None,
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
    per_image = PerImageScores(c)
    image_miou: dict[str, float] = {}
    n_scored = n_cached = 0

    def confusion(sample: Sample) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
        """((confusion matrix, the same with label 255 as background), whether it came from the
        cache) of one image."""
        entry = cache_dir / f"{sample.safe_stem}.npz" if cache_dir is not None else None
        signature = ""
        if entry is not None:
            signature = source.signature(sample) + "|" + file_signature(sample.label_path)
            if use_cache and entry.is_file():
                cached = _load_cached(entry, signature, (c, c + 1))
                if cached is not None:
                    return cached, True
        save_to = pred_dir / f"{sample.safe_stem}.png" if pred_dir is not None else None
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
        image_miou[sample.stem] = per_image.add(cm)

    miou, iou = dataset_miou(total)
    result = EvalResult(
        dataset=dataset.name, split=dataset.split, class_names=tuple(dataset.class_names),
        miou=miou, miou_per_image=per_image.miou,
        iou=iou, iou_per_image=per_image.iou_per_class, images_with_class=per_image.images_with_class,
        pixel_accuracy=pixel_accuracy(total), confusion=total, image_miou=image_miou,
        official_boundary=bool(official_boundary), source=source.describe(),
        settings_hash=digest, n_scored=n_scored, n_cached=n_cached, protocol=protocol)
    if out_dir is not None:
        result.files = write_reports(result, dataset, source, samples, Path(out_dir), examples,
                                     pred_dir)
    return result
