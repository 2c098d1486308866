"""Named segments as bounding boxes, and masks drawn from those boxes named back.

The box layout is ComfyUI's core BOUNDING_BOX value as its ``DrawBBoxes`` and ``SAM3_Detect``
read it (ComfyUI 0.33, ``comfy_extras/nodes_rtdetr.py`` / ``nodes_sam3.py``): one list per
image of ``{"x", "y", "width", "height"}`` dicts in pixels (top-left corner, integer sizes),
here with the segment's ``label`` and ``score`` added (DrawBBoxes writes a label it knows and
the score). ``SAM3_Detect`` given boxes and no text draws one mask per box, image by image
in box order, and returns no names (its own BOUNDING_BOX output lists text detections only);
``name_masks`` gives those masks their boxes' names back.
"""

from __future__ import annotations

import torch

from .segments import Segments


def to_bboxes(segments: Segments) -> list[list[dict]]:
    """One list per image (an empty list when nothing in it is named) of one box per named,
    non-empty mask, in the order of ``segments.records()`` (the order of the masks output):
    ``{"x", "y", "width", "height", "label", "score"}``, pixels, the mask's tight box."""
    out: list[list[dict]] = [[] for _ in range(segments.batch_size)]
    for rec in segments.records():
        x0, y0, x1, y1 = rec["bbox"]
        out[rec["image"]].append({"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0,
                                  "label": rec["label"], "score": rec["score"]})
    return out


def per_image(bboxes, batch: int) -> list[list[dict]]:
    """A BOUNDING_BOX value as one list of box dicts per image, the way SAM3_Detect reads it:
    one dict or a flat list of dicts is every image's boxes; a list of lists is per image
    (ComfyUI repeats the last image's boxes for images beyond it; here that is refused).
    ValueError naming `bboxes` for anything else."""
    if isinstance(bboxes, dict):
        bboxes = [bboxes]
    if not isinstance(bboxes, list):
        raise ValueError(f"bboxes: expected a dict or a list of box dicts, got {type(bboxes).__name__}")
    if bboxes and all(isinstance(frame, list) for frame in bboxes):
        if len(bboxes) != batch:
            raise ValueError(f"bboxes: {len(bboxes)} per-image box lists for {batch} image(s)")
        frames = bboxes
    else:
        frames = [bboxes] * batch
    for b, frame in enumerate(frames):
        for d in frame:
            if not isinstance(d, dict) or not all(isinstance(d.get(k), (int, float))
                                                  for k in ("x", "y", "width", "height")):
                raise ValueError(f"bboxes: image {b}: {d!r} is not a box dict with x, y, width and height")
    return [list(frame) for frame in frames]


def name_masks(masks: torch.Tensor, bboxes, batch: int, image_size: tuple[int, int]) -> Segments:
    """Segments of `batch` images from masks drawn one per box (SAM3_Detect with
    individual_masks on and no text: image 0's boxes in order, then image 1's, ...): mask i
    takes the label and score of box i (a box without a label is named "object"; without a
    score, 1.0). Images with fewer boxes get empty unnamed masks, so every image keeps its
    entry. `masks` is `[N,H,W]` (or `[H,W]`) at `image_size`.

    ValueError naming `masks` and `bboxes` when the counts or sizes disagree (e.g.
    individual_masks off, or a text prompt connected as well)."""
    frames = per_image(bboxes, batch)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks: expected [N,H,W], got shape {tuple(masks.shape)}")
    total = sum(len(f) for f in frames)
    if masks.shape[0] != total:
        raise ValueError(f"masks: {masks.shape[0]} mask(s) for the {total} box(es) in bboxes: the masks must be "
                         "one per box, image by image (SAM3 Detect: individual_masks on, no conditioning)")
    if total and tuple(masks.shape[-2:]) != tuple(image_size):
        raise ValueError(f"masks: {tuple(masks.shape[-2:])} is not the image size {tuple(image_size)}")
    k = max((len(f) for f in frames), default=0)
    out = torch.zeros((batch, k, *image_size), dtype=torch.float32)
    labels = [[None] * k for _ in range(batch)]
    scores = [[0.0] * k for _ in range(batch)]
    i = 0
    for b, frame in enumerate(frames):
        for j, box in enumerate(frame):
            out[b, j] = masks[i].float().cpu()
            labels[b][j] = str(box.get("label") or "object")
            scores[b][j] = float(box.get("score", 1.0))
            i += 1
    return Segments(out, labels, scores, [sorted({n for n in row if n}) for row in labels])
