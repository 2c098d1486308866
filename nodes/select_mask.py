"""FreeSegSelectMask: one MASK per image from segments picked by name or index."""

from __future__ import annotations

from ..freeseg.segments import Segments as SegmentsData
from .common import CATEGORY, Segments, io, log, parse_names


class FreeSegSelectMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegSelectMask",
            display_name="FreeSeg-Diff Select Mask",
            category=CATEGORY,
            description="The union of the segments with the given names (or mask indices), one mask per "
                        "image, ready for inpainting. A name that is absent gives an empty mask.",
            inputs=[
                Segments.Input("segments", tooltip="Labelled (or refined) FreeSeg-Diff segments."),
                io.String.Input("labels", default="", tooltip="Names or mask indices, comma-separated "
                                "(e.g. 'dog' or 'dog, cat' or '0, 2')."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="[B,H,W] at the image's size.")],
        )

    @classmethod
    def execute(cls, segments, labels) -> io.NodeOutput:
        if not isinstance(segments, SegmentsData):
            raise TypeError("segments: expected FreeSeg-Diff segments")
        wanted = parse_names(labels)
        mask = segments.select(wanted)
        if not bool(mask.any()):
            present = sorted({n for row in segments.labels for n in row if n is not None})
            log.warning("FreeSeg-Diff Select Mask: nothing matches %s; present labels: %s", wanted, present)
        return io.NodeOutput(mask)
