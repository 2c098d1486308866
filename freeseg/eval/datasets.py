"""Semantic-segmentation datasets for evaluation: Pascal VOC 2012 and COCO-Object.

Accepted layouts (ROOT is the folder given on the command line):

Pascal VOC 2012 (``load_voc``; 21 classes, index 0 = background, 255 = boundary/ignore)::

    ROOT/JPEGImages/<stem>.jpg
    ROOT/SegmentationClass/<stem>.png        palette PNG (mode P): pixel values are class indices
    ROOT/ImageSets/Segmentation/<split>.txt  one stem per line (split: val, train, trainval)

ROOT may also be a folder holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``.

COCO-Object (``load_coco_object``; 81 classes, index 0 = background, 1..80 = the 80 COCO
thing classes in the usual order, 255 = ignore), as produced by the common
``convert_coco_object`` scripts of GroupViT / TCL / mmsegmentation::

    ROOT/images/<split>/<stem>.jpg           (also .jpeg / .png)
    ROOT/annotations/<split>/<stem>.png      or <stem>_instanceTrainIds.png; mode L/P/I class indices

The split defaults to ``val2017``; every image of the images folder is a sample (sorted by
stem). Class names default to ``COCO_OBJECT_CLASSES`` and can be replaced by a text file (one
name per line, line i = class index i) with ``load_coco_object(..., class_names=...)``.

Label PNGs (ground truth or predictions) are read by ``read_label_png``, which accepts class
indices (modes L, P, I, I;16, 1) or the VOC colour palette (RGB/RGBA) and detects which.

No torch or ComfyUI import here: numpy and PIL only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "COCO_OBJECT_CLASSES", "DatasetError", "IGNORE_INDEX", "Sample", "SegDataset",
    "VOC_CLASSES", "VOC_VOCABULARY", "colorize", "color_palette", "load_coco_object",
    "load_dataset", "load_voc", "read_class_names", "read_label_png", "save_label_png",
]

IGNORE_INDEX = 255
"""Label value that marks pixels to ignore (VOC object boundaries, COCO crowd/void)."""

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
"""The 21 Pascal VOC 2012 class names, index = label value."""

VOC_VOCABULARY: dict[str, str] = {
    "diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
}
"""Readable forms of the VOC names written as one word (what a text encoder is given)."""

COCO_OBJECT_CLASSES: tuple[str, ...] = (
    "background",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
"""COCO-Object: background + the 80 COCO thing classes (index = label value)."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """A dataset or label file is present but unusable (bad values, shapes, colours)."""


# ------------------------------------------------------------------------------------
# Palette and label PNGs
# ------------------------------------------------------------------------------------

def color_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved), ``[n,3]`` uint8.

    Index 0 is black, 1 is (128,0,0), ..., 255 is (224,224,192), the VOC boundary colour.
    Used for COCO-Object too (COCO has no official palette).
    """
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


_PALETTE = color_palette(256)
_PALETTE_CODES = (_PALETTE[:, 0].astype(np.int64) << 16) | (_PALETTE[:, 1].astype(np.int64) << 8) \
    | _PALETTE[:, 2].astype(np.int64)


def colorize(label: np.ndarray) -> np.ndarray:
    """Class-index map ``[H,W]`` (0..255) -> RGB ``[H,W,3]`` uint8 in the VOC palette."""
    return _PALETTE[np.clip(np.asarray(label), 0, 255).astype(np.int64)]


def _decode_rgb(rgb: np.ndarray, path: Path) -> np.ndarray:
    """RGB ``[H,W,3]`` uint8 -> class indices ``[H,W]`` int64 via the VOC palette.

    Falls back to grey levels (R == G == B taken as the index) when some colour is not in
    the palette but every pixel is grey; otherwise raises DatasetError naming the colour.
    """
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) \
        | rgb[..., 2].astype(np.int64)
    uniq, inverse = np.unique(codes, return_inverse=True)
    lookup = {int(code): idx for idx, code in enumerate(_PALETTE_CODES)}
    mapped = np.array([lookup.get(int(code), -1) for code in uniq], dtype=np.int64)
    if (mapped >= 0).all():
        return mapped[inverse].reshape(codes.shape)
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].astype(np.int64)
    bad = int(uniq[mapped < 0][0])
    raise DatasetError(
        f"{path}: colour ({bad >> 16},{(bad >> 8) & 255},{bad & 255}) is not a VOC palette "
        f"colour; save predictions as class indices (mode L or P) or in the VOC palette")


def read_label_png(path: Path | str, num_classes: Optional[int] = None) -> np.ndarray:
    """Read a label map PNG as class indices ``[H,W]`` int64.

    Modes L, P (palette index = class), I, I;16 and 1 are class indices; RGB/RGBA pixels are
    decoded with the VOC palette (the boundary colour (224,224,192) gives 255). With
    ``num_classes`` every value must be in ``[0, num_classes)`` or be 255, else DatasetError
    naming the file and the value.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
                label = _decode_rgb(np.asarray(img.convert("RGB")), path)
            elif mode == "LA":
                label = np.asarray(img.getchannel("L")).astype(np.int64)
            elif mode == "PA":
                label = np.asarray(img.getchannel("P")).astype(np.int64)
            else:  # L, P, I, I;16*, 1, F
                label = np.asarray(img).astype(np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read as an image ({exc})") from None
    if label.ndim != 2:
        raise DatasetError(f"{path}: expected a single-channel label map, got shape {label.shape}")
    if num_classes is not None:
        bad = (label < 0) | ((label >= num_classes) & (label != IGNORE_INDEX))
        if bad.any():
            value = int(label[bad][0])
            raise DatasetError(
                f"{path}: label value {value} is outside 0..{num_classes - 1} (and is not "
                f"{IGNORE_INDEX}, the ignore value)")
    return label


def save_label_png(path: Path | str, label: np.ndarray) -> None:
    """Save class indices ``[H,W]`` (0..255) as a palette PNG (mode P, VOC colours)."""
    arr = np.asarray(label)
    if arr.ndim != 2 or arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise ValueError(f"label must be [H,W] with values 0..255, got shape {arr.shape}")
    img = Image.fromarray(arr.astype(np.uint8), mode="L").convert("P")
    img.putpalette(_PALETTE.reshape(-1).tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def read_class_names(path: Path | str) -> tuple[str, ...]:
    """Class names from a text file: one per line, line i = class index i (blank lines and
    lines starting with ``#`` are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DatasetError(f"{path}: no class names")
    return tuple(names)


# ------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One image of a split: its stem (also the prediction file name) and its files."""

    stem: str
    image_path: Path
    label_path: Path

    @property
    def safe_stem(self) -> str:
        """The stem with every character other than letters, digits and ``._-`` as ``_``: the
        name of the files the evaluator writes for this image (cache entry, saved prediction)."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.stem)


@dataclass
class SegDataset:
    """A split of a semantic-segmentation dataset.

    Attributes:
        name: "voc" or "coco-object" (or a caller's name).
        root: the dataset folder.
        split: split name ("val", "val2017", ...).
        class_names: C names, index = label value; index 0 is background.
        samples: the split's images, in split order.
        vocabulary: names to give a text encoder in open-vocabulary mode, one per class
            (index-aligned with class_names).
    """

    name: str
    root: Path
    split: str
    class_names: tuple[str, ...]
    samples: list[Sample]
    vocabulary: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.vocabulary:
            self.vocabulary = tuple(self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_image(self, sample: Sample) -> np.ndarray:
        """The image as RGB ``[H,W,3]`` uint8."""
        try:
            with Image.open(sample.image_path) as img:
                return np.asarray(img.convert("RGB")).copy()
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {sample.image_path}") from None
        except OSError as exc:
            raise DatasetError(f"{sample.image_path}: cannot read image ({exc})") from None

    def load_label(self, sample: Sample) -> np.ndarray:
        """Ground truth ``[H,W]`` int64: class indices, 255 = ignore."""
        return read_label_png(sample.label_path, self.num_classes)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def _voc_root(root: Path) -> Path:
    """ROOT itself, or ROOT/VOC2012, or ROOT/VOCdevkit/VOC2012 (first holding JPEGImages)."""
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    return root


def load_voc(root: Path | str, split: str = "val") -> SegDataset:
    """Pascal VOC 2012 segmentation split (see the module docstring for the layout).

    Raises FileNotFoundError naming the missing folder / split file / first missing files.
    """
    root = _require_dir(Path(root), "dataset root")
    base = _voc_root(root)
    images = _require_dir(base / "JPEGImages", "VOC images")
    labels = _require_dir(base / "SegmentationClass", "VOC labels")
    split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"VOC split file not found: {split_file}")
    stems = [s.strip() for s in split_file.read_text(encoding="utf-8").split() if s.strip()]
    samples = [Sample(s, images / f"{s}.jpg", labels / f"{s}.png") for s in stems]
    _check_files(samples)
    vocab = tuple(VOC_VOCABULARY.get(n, n) for n in VOC_CLASSES)
    return SegDataset("voc", base, split, VOC_CLASSES, samples, vocab)


def _coco_label_path(labels: Path, stem: str) -> Path:
    for name in (f"{stem}.png", f"{stem}_instanceTrainIds.png"):
        if (labels / name).is_file():
            return labels / name
    return labels / f"{stem}.png"


def load_coco_object(root: Path | str, split: str = "val2017",
                     class_names: Optional[Sequence[str]] = None) -> SegDataset:
    """COCO-Object semantic maps (see the module docstring for the layout).

    Args:
        root: dataset folder holding ``images/<split>`` and ``annotations/<split>``.
        split: sub-folder name, default ``val2017``.
        class_names: override of ``COCO_OBJECT_CLASSES`` (index = label value).
    """
    root = _require_dir(Path(root), "dataset root")
    images = _require_dir(root / "images" / split, "COCO images")
    labels = _require_dir(root / "annotations" / split, "COCO annotations")
    files = sorted(p for p in images.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images (*.jpg, *.jpeg, *.png) in {images}")
    samples = [Sample(p.stem, p, _coco_label_path(labels, p.stem)) for p in files]
    _check_files(samples)
    names = tuple(class_names) if class_names is not None else COCO_OBJECT_CLASSES
    return SegDataset("coco-object", root, split, names, samples)


def _check_files(samples: Sequence[Sample]) -> None:
    """Raise FileNotFoundError listing (up to 5) missing image / label files."""
    missing = [str(p) for s in samples for p in (s.image_path, s.label_path) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} dataset file(s) missing: "
                                + ", ".join(missing[:5]) + more)


DATASETS = ("voc", "coco-object")
DEFAULT_SPLITS = {"voc": "val", "coco-object": "val2017"}


def load_dataset(kind: str, root: Path | str, split: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None) -> SegDataset:
    """Load ``kind`` ("voc" or "coco-object") from ``root``; split defaults per dataset."""
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset {kind!r}; choose one of {', '.join(DATASETS)}")
    split = split or DEFAULT_SPLITS[kind]
    if kind == "voc":
        ds = load_voc(root, split)
        if class_names is not None:
            ds = SegDataset(ds.name, ds.root, ds.split, tuple(class_names), ds.samples)
        return ds
    return load_coco_object(root, split, class_names)


def file_signature(path: Path) -> str:
    """``"<size>:<mtime_ns>"`` of a file (used to notice changed files in the cache)."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"
