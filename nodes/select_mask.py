"""FreeSegSelectMask: one MASK per image from segments picked by name, index or pointing."""

from __future__ import annotations

import torch

from ..freeseg.points import check_points, parse_points, select_at_points
from ..freeseg.segments import Segments as SegmentsData
from ..freeseg.names import parse_names
from .common import CATEGORY, Segments, io, log


def select(segments: SegmentsData, labels: str, points: str = "") -> tuple[torch.Tensor, str]:
    """(`[B,H,W]` union of the segments named/indexed in `labels` or under `points`, one line
    per image listing what was picked as "index:label")."""
    if not isinstance(segments, SegmentsData):
        raise TypeError("segments: expected FreeSeg-Diff segments")
    wanted = parse_names(labels)
    where = parse_points(points)
    check_points(where, segments.image_size)
    mask = segments.select(wanted)
    wanted_l = {w.lower() for w in wanted}
    picked_idx = [{k for k, name in enumerate(row) if str(k) in wanted_l or (name or "").lower() in wanted_l}
                  for row in segments.labels]
    if where:
        at, hits = select_at_points(segments, where)
        mask = torch.maximum(mask, at)
        for b, row in enumerate(hits):
            picked_idx[b].update(row)
    if not bool(mask.any()):
        present = sorted({n for row in segments.labels for n in row if n is not None})
        log.warning("FreeSeg-Diff Select Mask: nothing matches %s / points %s; present labels: %s", wanted,
                    where, present)
    lines = [", ".join(f"{k}:{segments.labels[b][k] or 'background'}" for k in sorted(idx))
             for b, idx in enumerate(picked_idx)]
    return mask, "\n".join(lines)


class FreeSegSelectMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegSelectMask",
            display_name="FreeSeg-Diff Select Mask",
            category=CATEGORY,
            description="The union of the segments with the given names (or mask indices) or under the given "
                        "points, one mask per image, ready for inpainting. A name that is absent gives an "
                        "empty mask.",
            inputs=[
                Segments.Input("segments", tooltip="Labelled (or refined) FreeSeg-Diff segments."),
                io.String.Input("labels", default="", tooltip="Names or mask indices, comma-separated "
                                "(e.g. 'dog' or 'dog, cat' or '0, 2')."),
                io.String.Input("points", optional=True, default="", tooltip="Pick by pointing: pixel positions (x right, "
                                "y down) as 'x,y' pairs ('120,80; 300,200') or the JSON list of "
                                "{\"x\":..,\"y\":..} a points-editor node gives. The segment(s) under each "
                                "point are added, in every image of the batch."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="[B,H,W] at the image's size."),
                     io.String.Output(display_name="picked", tooltip="One line per image: the picked segments "
                                      "as index:label.")],
        )

    @classmethod
    def validate_inputs(cls, points=None) -> bool | str:
        try:
            parse_points(points or "")
        except ValueError as e:
            return f"points: {e}"
        return True

    @classmethod
    def execute(cls, segments, labels, points="") -> io.NodeOutput:
        return io.NodeOutput(*select(segments, labels, points))
