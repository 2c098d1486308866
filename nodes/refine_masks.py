"""FreeSegRefineMasks: CRF / guided-filter refinement and every output users chain on."""

from __future__ import annotations

import json
from typing import Optional

import torch

from ..freeseg.boxes import to_bboxes
from ..freeseg.segments import Segments as SegmentsData
from ..freeseg.segments import draw_overlay, to_segs
from ..freeseg.settings import CHOICES, DEFAULTS
from ..freeseg.stages import refine_segments, split_segments
from .common import CATEGORY, Progress, Segments, check_choice, check_number, first_problem, input_range, io, to_rgb, \
    on_compute_device


def refine(segments: SegmentsData, images, method: str = DEFAULTS.refine, instances: bool = False,
           min_area: float = DEFAULTS.min_area, device: Optional[torch.device] = None) -> SegmentsData:
    """Refines every mask of every image (one image at a time, interruptible), then with
    ``instances`` splits each named mask into its parts (the inputs checked as
    ``FreeSegSettings`` fields: ``refine``, ``instances``, ``min_area``). ``device``: where the
    refinement runs (None: the CPU); the masks come back on the CPU."""
    if not isinstance(segments, SegmentsData):
        raise TypeError("segments: expected FreeSeg-Diff segments")
    settings = DEFAULTS.replace(refine=method, instances=instances, min_area=min_area)
    pixels = to_rgb(images)
    refined = refine_segments(segments, pixels, settings.refine, progress=Progress(segments.batch_size),
                              device=device)
    return split_segments(refined, settings)


def outputs(segments: SegmentsData, images) -> tuple:
    """(masks [N,H,W], labels, union [B,H,W], SEGS, preview [B,H,W,3], json) of named segments."""
    pixels = to_rgb(images)
    records = segments.records()
    preview = torch.stack([draw_overlay(pixels[b], segments.masks[b], segments.labels[b])
                           for b in range(segments.batch_size)])
    labels = "\n".join(r["label"] for r in records)
    masks = segments.named_masks()
    if masks.shape[0] == 0:  # nothing named: one empty mask, so chained mask nodes still work
        masks = torch.zeros((1, *segments.image_size), dtype=torch.float32)
    return (masks, labels, segments.union(), to_segs(segments, pixels), preview,
            json.dumps(records))


OUTPUTS = [
    io.Mask.Output(display_name="masks", tooltip="[N,H,W]: one mask per named segment, at the image's "
                   "size (one all-zero mask when nothing is named)."),
    io.String.Output(display_name="labels", tooltip="One name per line, in the order of `masks`."),
    io.Mask.Output(display_name="union", tooltip="[B,H,W]: all named segments of each image."),
    io.SEGS.Output(display_name="segs", tooltip="Impact Pack SEGS with label and confidence."),
    io.Image.Output(display_name="preview", tooltip="Coloured overlay with the names written on it."),
    io.String.Output(display_name="json", tooltip="Per mask: image index, label, score, area, bbox."),
]

# ComfyUI's core bounding-box type (io.BoundingBox on 0.33 and newer); on older cores, where
# it does not exist, the same type name, so the output links to the core nodes wherever they exist.
BoundingBoxes = io.Custom("BOUNDING_BOX")
BBOXES_OUTPUT = BoundingBoxes.Output(
    display_name="bboxes", tooltip="The named segments as boxes, for core nodes that take boxes (SAM3 Detect, "
    "Draw BBoxes): per image a list of {x, y, width, height, label, score} in pixels, in the order of `masks` "
    "(an empty list for an image with nothing named).")


class FreeSegRefineMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegRefineMasks",
            display_name="FreeSeg-Diff Refine Masks",
            category=CATEGORY,
            description="Refines the labelled masks along image edges (dense CRF as in the paper, checked by a "
                        "guided filter by default, or a guided filter alone) and outputs masks, labels, SEGS, "
                        "a preview and JSON.",
            inputs=[
                Segments.Input("segments", tooltip="Output of FreeSeg-Diff CLIP Label."),
                io.Image.Input("image", tooltip="The same images the segments came from."),
                io.Combo.Input("method", options=list(CHOICES["refine"]), default=DEFAULTS.refine, tooltip="crf_guard (default): "
                               "the paper's CRF, but a named mask the guided filter disagrees with (the CRF "
                               "erased or shrank it, as it does thin or low-contrast objects in photos) takes "
                               "the guided filter's mask. crf: the paper's refinement, one fully connected CRF "
                               "per named mask (unnamed masks become empty). crf_joint: one CRF over all masks, "
                               "named or not. guided: edge-aware guided filter. none: as is."),
                io.Boolean.Input("instances", optional=True, default=DEFAULTS.instances, tooltip="Split each named mask into its connected "
                                 "parts (two dogs -> two masks), each its own entry in masks, SEGS and JSON "
                                 "with the same label and an instance index (0 = largest). Off: one mask per "
                                 "name (paper)."),
                io.Float.Input("min_area", optional=True, default=DEFAULTS.min_area, **input_range("min_area"), step=0.001,
                               tooltip="With instances: "
                               "parts smaller than this fraction of the image are dropped as specks (a "
                               "name always keeps its largest part)."),
            ],
            outputs=[Segments.Output(display_name="segments"), *OUTPUTS, BBOXES_OUTPUT],
        )

    @classmethod
    def validate_inputs(cls, method=None, min_area=None) -> bool | str:
        # Declaring min_area here makes ComfyUI skip its own min/max check of it (NaN passes any
        # comparison), so the range is checked here.
        return first_problem(check_choice("method", method, CHOICES["refine"]), check_number("min_area", min_area))

    @classmethod
    def execute(cls, segments, image, method, instances=DEFAULTS.instances,
                min_area=DEFAULTS.min_area) -> io.NodeOutput:
        with on_compute_device() as device:  # ComfyUI's GPU when there is one; else the free CPU cores
            refined = refine(segments, image, method, instances, min_area, device)
        return io.NodeOutput(refined, *outputs(refined, image), to_bboxes(refined))
