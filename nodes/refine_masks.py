"""FreeSegRefineMasks: CRF / guided-filter refinement and every output users chain on."""

from __future__ import annotations

import json

import torch

from ..freeseg.instances import split_instances
from ..freeseg.refine import REFINE_METHODS
from ..freeseg.stages import refine_segments
from ..freeseg.segments import Segments as SegmentsData
from ..freeseg.segments import draw_overlay, to_segs
from .common import CATEGORY, Progress, Segments, check_choice, check_number, first_problem, io, to_rgb



def refine(segments: SegmentsData, images, method: str = "crf") -> SegmentsData:
    """Refines every mask of every image (one image at a time, interruptible)."""
    if not isinstance(segments, SegmentsData):
        raise TypeError("segments: expected FreeSeg-Diff segments")
    return refine_segments(segments, to_rgb(images), method, progress=Progress(segments.batch_size))


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


class FreeSegRefineMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegRefineMasks",
            display_name="FreeSeg-Diff Refine Masks",
            category=CATEGORY,
            description="Refines the labelled masks along image edges (dense CRF as in the paper, or a guided "
                        "filter) and outputs masks, labels, SEGS, a preview and JSON.",
            inputs=[
                Segments.Input("segments", tooltip="Output of FreeSeg-Diff CLIP Label."),
                io.Image.Input("image", tooltip="The same images the segments came from."),
                io.Combo.Input("method", options=list(REFINE_METHODS), default="crf", tooltip="crf: the paper's "
                               "refinement, one fully connected CRF per named mask (unnamed masks become "
                               "empty). crf_joint: one CRF over all masks, named or not. guided: edge-aware "
                               "guided filter. none: as is."),
                io.Boolean.Input("instances", optional=True, default=False, tooltip="Split each named mask into its connected "
                                 "parts (two dogs -> two masks), each its own entry in masks, SEGS and JSON "
                                 "with the same label and an instance index (0 = largest). Off: one mask per "
                                 "name (paper)."),
                io.Float.Input("min_area", optional=True, default=0.002, min=0.0, max=0.5, step=0.001, tooltip="With instances: "
                               "parts smaller than this fraction of the image are dropped as specks (a "
                               "name always keeps its largest part)."),
            ],
            outputs=[Segments.Output(display_name="segments"), *OUTPUTS],
        )

    @classmethod
    def validate_inputs(cls, method=None, min_area=None) -> bool | str:
        # Declaring min_area here makes ComfyUI skip its own min/max check of it (NaN passes any
        # comparison), so the range is checked here.
        return first_problem(check_choice("method", method, REFINE_METHODS), check_number("min_area", min_area, 0.0, 0.5))

    @classmethod
    def execute(cls, segments, image, method, instances=False, min_area=0.002) -> io.NodeOutput:
        if isinstance(min_area, bool) or not isinstance(min_area, (int, float)) or not 0.0 <= min_area <= 0.5:
            raise ValueError(f"min_area must be a number in 0..0.5, got {min_area!r}")
        if not isinstance(instances, bool):
            raise ValueError(f"instances must be true or false, got {instances!r}")
        refined = refine(segments, image, method)
        if instances:
            refined = split_instances(refined, float(min_area))
        return io.NodeOutput(refined, *outputs(refined, image))
