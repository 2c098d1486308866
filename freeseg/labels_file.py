"""labels.json and the files beside it: the one layout of a saved segmentation.

Save Segments (the node) and ``python -m freeseg segment`` (both backends) write through
`write_segments`, so every saved segmentation has the same files and the same document:

* one overlay PNG per image (RGB: the coloured masks with their names);
* one PNG per named mask (mode L, 255 = fully in; Save Segments keeps soft edges, the command
  line writes 0 / 255), named ``mask_<i>_<label>.png`` with the label through `safe_label`;
* labels.json, the document (``LABELS_FORMAT`` names its version)::

    {"format": "freeseg-diff/segments-v2", "width": W, "height": H,
     "backend": "comfyui" | "diffusers", "settings": {...}, "timings": {...},
     "images": [{"index": b, "source": "<image file or ''>", "overlay": "<file>",
                 "caption": "...", "class_names": [...]}, ...],
     "masks": [{"index": i, "image": b, "mask": k, "label", "score", "area", "bbox",
                "file"}, ...],
     "labels": "<the name of labels.json itself>"}

  ``index`` counts the named masks of the whole save (batch, then mask order); ``image`` is the
  image's index in ``images``, ``mask`` the mask's index among that image's masks; ``area`` is
  in pixels, ``bbox`` ``[x0, y0, x1, y1]`` with exclusive ends (None for an empty mask); a
  mask split into instances also has ``instance``. ``source`` is empty where the image came
  from no file (inside ComfyUI).

File names (`file_names`): with a stem (Save Segments: ``<prefix>_<counter>``) every name
starts with it and the overlays are numbered, ``<stem>_overlay_<b>.png``,
``<stem>_mask_<i>_<label>.png``, ``<stem>_labels.json``; without one (the command line's
folder of one image) they are ``overlay.png``, ``mask_<i>_<label>.png`` and ``labels.json``.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

LABELS_FORMAT = "freeseg-diff/segments-v2"  # v1: Save Segments' layout before the command line shared it
LABEL_CHARS = 60  # the most characters of a label that go into a file name

Pixels = Union[np.ndarray, torch.Tensor, Image.Image]


def safe_label(label: str) -> str:
    """A label as a short, ASCII-only file-name part, the one rule for every mask file: accents
    dropped (e-acute -> "e"), runs of other characters than ASCII letters and digits become "_"
    ("potted plant" -> "potted_plant"), cut to LABEL_CHARS characters; "mask" when nothing is
    left (an empty label, or one of only symbols or non-Latin letters). The full label is kept
    in labels.json; the mask index in front of this part keeps file names unique."""
    text = unicodedata.normalize("NFKD", str(label)).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:LABEL_CHARS].rstrip("_") or "mask"


def mask_file_name(index: int, label: str, stem: str = "") -> str:
    """``[<stem>_]mask_<index>_<label>.png``, the label through `safe_label`."""
    return f"{stem}_mask_{index}_{safe_label(label)}.png" if stem else f"mask_{index}_{safe_label(label)}.png"


def file_names(stem: str, n_images: int, labels: Sequence[str]) -> tuple[list[str], list[str], str]:
    """(overlay names, mask names, labels.json name) of a save of `n_images` images and one named
    mask per label (see the module's docstring). Without a stem, a save holds one image."""
    if not stem and n_images != 1:
        raise ValueError(f"a save without a file-name stem holds one image, not {n_images}")
    overlays = [f"{stem}_overlay_{b}.png" for b in range(n_images)] if stem else ["overlay.png"]
    masks = [mask_file_name(i, label, stem) for i, label in enumerate(labels)]
    return overlays, masks, f"{stem}_labels.json" if stem else "labels.json"


def to_png(pixels: Pixels) -> Image.Image:
    """An 8-bit PIL image of `[H,W]` (grey) or `[H,W,3]` (RGB) pixels: bool is 0 / 255, floats
    are 0..1 (clamped, rounded), uint8 is kept; a PIL image is returned as it is."""
    if isinstance(pixels, Image.Image):
        return pixels
    array = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB")


def write_segments(folder: str, masks: Sequence[Pixels], records: Sequence[dict], overlays: Sequence[Pixels],
                   images: Sequence[dict], stem: str = "", backend: str = "comfyui",
                   settings: Optional[dict] = None, timings: Optional[dict] = None) -> dict:
    """Write the overlays, the masks and labels.json of one save into `folder` (created if
    needed); returns the labels document. Every name is made before the first file is
    written, so a problem with the inputs writes nothing.

    Args:
        masks: one `[H,W]` mask per named segment (bool, float 0..1 or uint8), in record order.
        records: one dict per mask: ``image``, ``mask``, ``label``, ``score``, ``area``,
            ``bbox`` (and ``instance``), kept as given.
        overlays: one `[H,W,3]` overlay (or PIL image) per image.
        images: one dict per image: ``source``, ``caption``, ``class_names``.
        stem: the start of every file name ("" for a folder of one image's files).
    """
    if len(masks) != len(records):
        raise ValueError(f"{len(masks)} masks but {len(records)} records")
    if len(overlays) != len(images):
        raise ValueError(f"{len(overlays)} overlays but {len(images)} images")
    overlay_names, mask_names, labels_name = file_names(stem, len(images), [str(r["label"]) for r in records])
    overlay_pngs = [to_png(o).convert("RGB") for o in overlays]
    mask_pngs = [to_png(m).convert("L") for m in masks]
    width, height = overlay_pngs[0].size if overlay_pngs else (0, 0)
    doc: dict[str, Any] = {
        "format": LABELS_FORMAT, "width": width, "height": height, "backend": backend,
        "settings": dict(settings or {}), "timings": dict(timings or {}),
        "images": [{"index": b, "source": str(info.get("source") or ""), "overlay": name,
                    "caption": str(info.get("caption") or ""), "class_names": list(info.get("class_names") or [])}
                   for b, (info, name) in enumerate(zip(images, overlay_names))],
        "masks": [{"index": i, **rec, "file": name} for i, (rec, name) in enumerate(zip(records, mask_names))],
        "labels": labels_name,
    }
    os.makedirs(folder, exist_ok=True)
    for png, name in zip(overlay_pngs + mask_pngs, overlay_names + mask_names):
        png.save(os.path.join(folder, name))
    with open(os.path.join(folder, labels_name), "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    return doc
