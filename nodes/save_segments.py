"""FreeSegSaveSegments: the segmentation as files in ComfyUI's output folder (one PNG per named
mask, one overlay PNG per image, labels.json), listed in the node's UI output so that any
client that downloads through /view (and the frontend's queue panel) gets all of it. The files
and labels.json are those of ``freeseg.labels_file`` (the layout ``freeseg segment`` writes)."""

from __future__ import annotations

import os

import torch

import folder_paths

from ..freeseg.labels_file import write_segments
from ..freeseg.segments import Segments as SegmentsData
from ..freeseg.segments import draw_overlay
from .common import CATEGORY, Segments, io, to_rgb


NAME_BYTES = 255  # the longest file or folder name most file systems take
PREFIX_NAME_BYTES = 120  # the longest file-name part of filename_prefix: the counter, index and label fit in 255


def prefix_problem(prefix, output_dir: str) -> str | None:
    """Why `prefix` cannot name Save Segments' files in `output_dir`, or None.

    Refused: anything but text; control characters (line breaks included) or text that is not
    valid Unicode; a prefix that names no file or leaves the output folder; a file-name part
    (after the last "/") that holds "..", because ComfyUI's /view refuses to serve any file name
    with ".." in it, or that is over PREFIX_NAME_BYTES bytes of UTF-8; a folder name over
    NAME_BYTES bytes. Folder names may hold ".." inside a name ("v1..2/seg"): /view serves those."""
    if not isinstance(prefix, str):
        return f"filename_prefix must be text, got {type(prefix).__name__}"
    shown = f"filename_prefix {prefix!r}"
    if any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        return f"{shown} holds a control character (e.g. a line break); use printable characters"
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:
        return f"{shown} is not valid Unicode text"
    output_dir = os.path.abspath(output_dir)
    norm = os.path.normpath(prefix)
    target = os.path.abspath(os.path.join(output_dir, norm))
    folders, name = os.path.split(norm)
    if not name.strip(". ") or target == output_dir:
        return f"{shown} names no file (e.g. freeseg/segments)"
    if os.path.isabs(prefix) or os.path.commonpath((output_dir, target)) != output_dir:
        return f"{shown} leaves ComfyUI's output folder; give a relative prefix"
    if ".." in name:
        return (f"{shown}: its file-name part {name!r} holds '..', and ComfyUI's /view refuses to serve such "
                f"files; use another name (e.g. {name.replace('..', '_')!r})")
    if len(name.encode("utf-8")) > PREFIX_NAME_BYTES:
        return f"{shown}: its file-name part is over {PREFIX_NAME_BYTES} bytes long; use a shorter name"
    if any(len(folder.encode("utf-8")) > NAME_BYTES for folder in folders.split(os.sep)):
        return f"{shown}: a folder name in it is over {NAME_BYTES} bytes long; use shorter folder names"
    return None


def save_segments(segments: SegmentsData, images: torch.Tensor, folder: str, stem: str,
                  subfolder: str = "") -> tuple[list[dict], list[dict], dict]:
    """Write the files of one run into `folder` through ``freeseg.labels_file.write_segments``,
    every name starting with `stem`:

    * ``<stem>_overlay_<b>.png``: image b's coloured overlay with the names (RGB);
    * ``<stem>_mask_<i>_<label>.png``: named mask i (8-bit grey, 255 = fully in, soft edges
      kept), i in the order of Refine Masks' `masks` and `labels` outputs (batch, then mask
      order); the label through ``freeseg.labels_file.safe_label`` (ASCII, at most 60
      characters: the full label is in labels.json);
    * ``<stem>_labels.json``: the document returned (``freeseg.labels_file``; ``backend``
      "comfyui", no settings or timings, ``source`` and ``caption`` empty).

    Every name is made before the first file is written, so a problem with the inputs stops the
    save before it writes anything.

    Args:
        segments: `[B,K,H,W]` labelled segments; images: the `[B,H,W,C]` batch they came from.
        subfolder: the output subfolder the file entries name (as /view takes it).
    Returns:
        (image entries, other file entries) as ``{"filename", "subfolder", "type": "output"}``
        (overlays first, then masks; labels.json), and the labels document.
    """
    pixels = to_rgb(images)
    if pixels.shape[0] != segments.batch_size or tuple(pixels.shape[1:3]) != segments.image_size:
        raise ValueError(f"image: {tuple(pixels.shape[:3])} is not the [B,H,W]="
                         f"{(segments.batch_size, *segments.image_size)} batch the segments came from")
    records = segments.records()
    overlays = [draw_overlay(pixels[b], segments.masks[b], segments.labels[b]) for b in range(segments.batch_size)]
    masks = [segments.masks[rec["image"], rec["mask"]].float() for rec in records]
    infos = [{"class_names": list(segments.class_names[b]) if b < len(segments.class_names) else []}
             for b in range(segments.batch_size)]
    doc = write_segments(folder, masks, records, overlays, infos, stem=stem)

    def entry(name: str) -> dict:
        return {"filename": name, "subfolder": subfolder, "type": "output"}

    names = [i["overlay"] for i in doc["images"]] + [m["file"] for m in doc["masks"]]
    return [entry(name) for name in names], [entry(doc["labels"])], doc


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
                                "files, relative to the output folder (may hold a subfolder, as in Save Image). "
                                "Refused when queued: a file-name part with '..' in it (ComfyUI's /view does not "
                                "serve such files) or over 120 bytes, a prefix that leaves the output folder. "
                                "Labels go into mask file names as ASCII, cut to 60 characters."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        """Refuses, at queue time, a prefix `prefix_problem` finds fault with (None: linked,
        checked when the node runs)."""
        if filename_prefix is None:
            return True
        return prefix_problem(filename_prefix, folder_paths.get_output_directory()) or True

    @classmethod
    def execute(cls, segments, image, filename_prefix) -> io.NodeOutput:
        if not isinstance(segments, SegmentsData):
            raise TypeError("segments: expected FreeSeg-Diff segments")
        output_dir = folder_paths.get_output_directory()
        problem = prefix_problem(filename_prefix, output_dir)
        if problem:
            raise ValueError(problem)
        height, width = segments.image_size
        # normpath: ComfyUI counts earlier saves by the prefix's last part, which is empty for "seg/".
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            os.path.normpath(filename_prefix), output_dir, width, height)
        images, files, _ = save_segments(segments, image, folder, f"{filename}_{counter:05}", subfolder)
        return io.NodeOutput(ui={"images": images, "files": files})
