"""FreeSegSaveSegments: the segmentation as files in ComfyUI's output folder (one PNG per named
mask, one overlay PNG per image, labels.json), listed in the node's UI output so that any
client that downloads through /view (and the frontend's queue panel) gets all of it."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

import folder_paths

from ..freeseg.app.output import safe_label
from ..freeseg.segments import Segments as SegmentsData
from ..freeseg.segments import draw_overlay
from .common import CATEGORY, Segments, io, to_rgb

LABELS_FORMAT = "freeseg-diff/segments-v1"


def to_png(array: torch.Tensor) -> Image.Image:
    """`[H,W]` (grey) or `[H,W,3]` (RGB) float 0..1 -> an 8-bit PIL image."""
    pixels = (array.detach().float().cpu().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")


def save_segments(segments: SegmentsData, images: torch.Tensor, folder: str, stem: str,
                  subfolder: str = "") -> tuple[list[dict], list[dict], dict]:
    """Write the files of one run into `folder`, every name starting with `stem`:

    * ``<stem>_overlay_<b>.png``: image b's coloured overlay with the names (RGB);
    * ``<stem>_mask_<i>_<label>.png``: named mask i (8-bit grey, 255 = fully in), i in the
      order of Refine Masks' `masks` and `labels` outputs (batch, then mask order);
    * ``<stem>_labels.json``: the document returned.

    Args:
        segments: `[B,K,H,W]` labelled segments; images: the `[B,H,W,C]` batch they came from.
        subfolder: the output subfolder the file entries name (as /view takes it).
    Returns:
        (image entries, other file entries) as ``{"filename", "subfolder", "type": "output"}``
        (overlays first, then masks; labels.json), and the labels document:
        ``{"format", "width", "height", "images": [{"index", "overlay", "class_names"}],
        "masks": [{"index", "image", "mask", "label", "score", "area", "bbox", "file"}],
        "labels": "<labels.json name>"}`` (bbox ``[x0, y0, x1, y1]``, exclusive ends, or None).
    """
    pixels = to_rgb(images)
    if pixels.shape[0] != segments.batch_size or tuple(pixels.shape[1:3]) != segments.image_size:
        raise ValueError(f"image: {tuple(pixels.shape[:3])} is not the [B,H,W]="
                         f"{(segments.batch_size, *segments.image_size)} batch the segments came from")
    os.makedirs(folder, exist_ok=True)

    def entry(name: str) -> dict:
        return {"filename": name, "subfolder": subfolder, "type": "output"}

    image_files, doc_images, doc_masks = [], [], []
    for b in range(segments.batch_size):
        name = f"{stem}_overlay_{b}.png"
        to_png(draw_overlay(pixels[b], segments.masks[b], segments.labels[b])).save(os.path.join(folder, name))
        image_files.append(entry(name))
        doc_images.append({"index": b, "overlay": name,
                           "class_names": list(segments.class_names[b]) if b < len(segments.class_names) else []})
    for i, rec in enumerate(segments.records()):
        name = f"{stem}_mask_{i}_{safe_label(rec['label'])}.png"
        to_png(segments.masks[rec["image"], rec["mask"]]).save(os.path.join(folder, name))
        image_files.append(entry(name))
        doc_masks.append({"index": i, **rec, "file": name})
    labels_name = f"{stem}_labels.json"
    height, width = segments.image_size
    doc = {"format": LABELS_FORMAT, "width": width, "height": height, "images": doc_images, "masks": doc_masks,
           "labels": labels_name}
    with open(os.path.join(folder, labels_name), "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    return image_files, [entry(labels_name)], doc


class FreeSegSaveSegments(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegSaveSegments",
            display_name="FreeSeg-Diff Save Segments",
            category=CATEGORY,
            description="Saves the segmentation into ComfyUI's output folder: one PNG per named mask, the "
                        "overlay of each image and labels.json (labels, scores, boxes, file names), so API "
                        "clients can download everything through /view.",
            inputs=[
                Segments.Input("segments", tooltip="Output of FreeSeg-Diff Refine Masks (or CLIP Label)."),
                io.Image.Input("image", tooltip="The same images the segments came from."),
                io.String.Input("filename_prefix", default="freeseg/segments", tooltip="Prefix of the saved "
                                "files, relative to the output folder (may hold a subfolder, as in Save Image)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix) -> bool | str:
        """Refuses, at queue time, a prefix that names no file or leaves the output folder."""
        if not isinstance(filename_prefix, str):  # linked: checked when it runs
            return True
        output_dir = os.path.abspath(folder_paths.get_output_directory())
        target = os.path.abspath(os.path.join(output_dir, os.path.normpath(filename_prefix)))
        if not os.path.basename(os.path.normpath(filename_prefix)).strip(". ") or target == output_dir:
            return f"filename_prefix {filename_prefix!r} names no file (e.g. freeseg/segments)"
        if os.path.isabs(filename_prefix) or os.path.commonpath((output_dir, target)) != output_dir:
            return f"filename_prefix {filename_prefix!r} leaves ComfyUI's output folder; give a relative prefix"
        return True

    @classmethod
    def execute(cls, segments, image, filename_prefix) -> io.NodeOutput:
        if not isinstance(segments, SegmentsData):
            raise TypeError("segments: expected FreeSeg-Diff segments")
        height, width = segments.image_size
        output_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output_dir, width, height)
        images, files, _ = save_segments(segments, image, folder, f"{filename}_{counter:05}", subfolder)
        return io.NodeOutput(ui={"images": images, "files": files})
