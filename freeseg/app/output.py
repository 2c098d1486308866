"""The command line's output folder of one image: one PNG per named mask (0 / 255),
overlay.png and labels.json, in the layout of ``freeseg.labels_file`` (the one Save Segments
writes too). Both backends of `python -m freeseg segment` (ComfyUI and diffusers) write through
here."""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..labels_file import write_segments
from ..segments import draw_overlay, mask_bbox


class SegmentError(RuntimeError):
    """A problem the user can fix (missing weights, bad options); printed without a traceback."""


def write_segmentation(out_dir: str, image_path: str, masks: list[np.ndarray], records: list[dict],
                       overlay: Image.Image, caption: str = "", class_names: Optional[list[str]] = None,
                       backend: str = "comfyui", settings: Optional[dict] = None,
                       timings: Optional[dict] = None) -> dict:
    """Write the masks, overlay.png and labels.json of one image into `out_dir` through
    ``freeseg.labels_file.write_segments``; returns the labels document.

    Args:
        masks: one HxW mask per named segment (bool, or float/uint8 where >= 0.5 / 128 is in),
            written 0 / 255.
        records: one dict per mask with at least ``label`` (and ``score``, ``mask``); ``image``
            is 0, area and bbox are recomputed from the written masks so the JSON and the files
            always agree.
        overlay: the labelled overlay (saved as RGB PNG).
    Old ``mask_<i>_*.png`` files in `out_dir` are removed first, so the folder holds one run.
    """
    if len(masks) != len(records):
        raise SegmentError(f"{len(masks)} masks but {len(records)} labels came back")
    binary = []
    for mask in masks:
        m = np.asarray(mask)
        binary.append(m if m.dtype == bool else (m >= (128 if m.dtype == np.uint8 else 0.5)))
    entries = [{"image": 0, "mask": int(rec.get("mask", i)), "label": rec["label"],
                "score": float(rec.get("score", 0.0)), "area": int(m.sum()), "bbox": mask_bbox(torch.from_numpy(m)),
                **({"instance": rec["instance"]} if "instance" in rec else {})}
               for i, (m, rec) in enumerate(zip(binary, records))]
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if re.fullmatch(r"mask_\d+_[A-Za-z0-9_]*\.png", name):
                os.remove(os.path.join(out_dir, name))
    image = {"source": str(image_path), "caption": caption, "class_names": list(class_names or [])}
    return write_segments(out_dir, binary, entries, [overlay], [image], backend=backend, settings=settings,
                          timings=timings)


# -- models ---------------------------------------------------------------------------------------


def segment_to_folder(pipeline: Any, image_path: str, out_dir: str,
                      class_names: Union[str, Sequence[str], None] = None,
                      source: Optional[str] = None) -> dict[str, Any]:
    """Segment one image file with a ``freeseg.backends.diffusers.FreeSegPipeline`` and write
    the results into ``out_dir`` (created if needed), through ``write_segmentation``:

    * ``mask_<i>_<label>.png``: one 8-bit greyscale PNG (0 / 255, mask > 0.5) per NAMED mask,
      i = 0.. in mask order, label made file-name safe and short (``safe_label``);
    * ``overlay.png``: coloured masks with their names over the image;
    * ``labels.json``: the returned document (``freeseg.labels_file``), ``backend``
      ``"diffusers"``; its image ``source`` is `source` when given (a copy of the image was
      segmented), else `image_path`.
    """
    from ..backends.diffusers import load_image

    pixels = load_image(image_path)
    result = pipeline.segment(pixels[0], class_names)
    masks = [(result.masks[rec["mask"]] > 0.5).numpy() for rec in result.records()]
    overlay = draw_overlay(pixels[0], result.masks, result.labels)
    overlay_image = Image.fromarray((overlay.numpy() * 255).round().astype(np.uint8))
    return write_segmentation(str(out_dir), str(source or image_path), masks, result.records(), overlay_image,
                              result.caption, list(result.class_names), backend="diffusers",
                              settings=result.settings.to_dict(),
                              timings={k: round(v, 4) for k, v in result.timings.items()})
