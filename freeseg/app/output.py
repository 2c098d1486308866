"""Writing a segmentation to a folder: one PNG per named mask, overlay.png and labels.json.

Both backends of `python -m freeseg segment` (ComfyUI and diffusers) write through here, so
their folders have the same layout."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..segments import draw_overlay, mask_bbox


class SegmentError(RuntimeError):
    """A problem the user can fix (missing weights, bad options); printed without a traceback."""


LABEL_CHARS = 60  # the most characters of a label that go into a file name


def safe_label(label: str) -> str:
    """A label as a short, ASCII-only file-name part, the one rule for the CLI's mask files and
    Save Segments': accents dropped (e-acute -> "e"), runs of other characters than ASCII letters
    and digits become "_" ("potted plant" -> "potted_plant"), cut to LABEL_CHARS
    characters; "mask" when nothing is left (an empty label, or one of only symbols or non-Latin
    letters). The full label is kept in labels.json; the mask index in front of this part keeps
    file names unique."""
    text = unicodedata.normalize("NFKD", str(label)).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:LABEL_CHARS].rstrip("_") or "mask"


def mask_file_name(index: int, label: str) -> str:
    """``mask_<index>_<label>.png``, the label through `safe_label`."""
    return f"mask_{index}_{safe_label(label)}.png"


def write_segmentation(out_dir: str, image_path: str, masks: list[np.ndarray], records: list[dict],
                       overlay: Image.Image, caption: str = "", class_names: Optional[list[str]] = None,
                       backend: str = "comfyui", settings: Optional[dict] = None,
                       timings: Optional[dict] = None) -> dict:
    """Write the masks, overlay.png and labels.json into `out_dir`; returns the labels document,
    in the layout ``segment_to_folder`` (the diffusers backend) writes.

    Args:
        masks: one HxW mask per named segment (bool, or float/uint8 where >= 0.5 / 128 is in).
        records: one dict per mask with at least ``label`` (and ``score``); area and bbox are
            recomputed from the written masks so the JSON and the files always agree.
        overlay: the labelled overlay (saved as RGB PNG).
    Old ``mask_<i>_*.png`` files in `out_dir` are removed first, so the folder holds one run.
    """
    if len(masks) != len(records):
        raise SegmentError(f"{len(masks)} masks but {len(records)} labels came back")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if re.fullmatch(r"mask_\d+_[A-Za-z0-9_]*\.png", name):
            os.remove(os.path.join(out_dir, name))
    overlay = overlay.convert("RGB")
    width, height = overlay.size
    entries = []
    for i, (mask, rec) in enumerate(zip(masks, records)):
        m = np.asarray(mask)
        m = m if m.dtype == bool else (m >= (128 if m.dtype == np.uint8 else 0.5))
        height, width = m.shape
        name = mask_file_name(i, rec["label"])
        Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(os.path.join(out_dir, name))
        area, bbox = int(m.sum()), mask_bbox(torch.from_numpy(m))
        entries.append({"index": i, "file": name, "label": rec["label"], "score": float(rec.get("score", 0.0)),
                        "area": area, "bbox": bbox})
    overlay.save(os.path.join(out_dir, "overlay.png"))
    doc = {"image": str(image_path), "width": width, "height": height, "caption": caption,
           "class_names": list(class_names or []), "backend": backend, "settings": dict(settings or {}),
           "overlay": "overlay.png", "masks": entries, "timings": dict(timings or {})}
    with open(os.path.join(out_dir, "labels.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    return doc


# -- models ---------------------------------------------------------------------------------------


def segment_to_folder(pipeline: Any, image_path: str, out_dir: str,
                      class_names: Union[str, Sequence[str], None] = None) -> dict[str, Any]:
    """Segment one image file with a ``freeseg.backends.diffusers.FreeSegPipeline`` and write
    the results into ``out_dir`` (created if needed), through ``write_segmentation``:

    * ``mask_<i>_<label>.png``: one 8-bit greyscale PNG (0 / 255, mask > 0.5) per NAMED mask,
      i = 0.. in mask order, label made file-name safe and short (``safe_label``);
    * ``overlay.png``: coloured masks with their names over the image;
    * ``labels.json``: the returned dict.

    Returns:
        ``{"image": path, "width", "height", "caption", "class_names", "backend": "diffusers",
        "settings": {...}, "overlay": "overlay.png", "masks": [{"index": i, "file",
        "label", "score", "area", "bbox": [x0, y0, x1, y1] (exclusive ends) or None}, ...],
        "timings": {...}}``.
    """
    from ..backends.diffusers import load_image

    pixels = load_image(image_path)
    result = pipeline.segment(pixels[0], class_names)
    masks = [(result.masks[rec["mask"]] > 0.5).numpy() for rec in result.records()]
    overlay = draw_overlay(pixels[0], result.masks, result.labels)
    overlay_image = Image.fromarray((overlay.numpy() * 255).round().astype(np.uint8))
    return write_segmentation(str(out_dir), str(image_path), masks, result.records(), overlay_image,
                              result.caption, list(result.class_names), backend="diffusers",
                              settings=result.settings.to_dict(),
                              timings={k: round(v, 4) for k, v in result.timings.items()})
